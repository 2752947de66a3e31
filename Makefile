# smoledge: two commands do all the set-up on a fresh machine.
#   make demo   install the [export] extra, build the real-text demo model, export an INT4 bundle (only when
#               it is missing or older than the export code), answer a question about an image
#   make test   install the [dev] extra, run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev
BUNDLE ?= bundles/smolvlm-realtext-int4
IMAGE  ?= examples/house.png
PROMPT ?= What is the capital of France? Answer in one sentence.
# what the demo bundle is built from: a newer file here (or a new install) re-exports it, nothing else does
EXPORT_SOURCES := $(shell find export quantize -name '*.py' -o -name '*.json' -o -name '*.txt')

.PHONY: setup demo test test-fast bench bench-full check-arm64 clean distclean js-setup test-js bench-js

setup: $(VENV)/.installed-$(EXTRAS)

# about how much each extra puts into .venv (measured on Linux x86-64, CPU-only torch)
SIZE_export := about 1.3 GB, 0.3 GB to download: torch's CPU build, transformers, onnx; a few minutes
SIZE_dev    := about 2.1 GB: [export] + executorch, coremltools, PyAV, starlette, pytest, matplotlib
SIZE_bench  := [dev] + llama-cpp-python, built from source (10-35 minutes)

# Two steps: the editable build alone, quietly (seconds; setuptools notes that an editable install with
# mapped package folders uses a meta path finder), then the extra's packages with pip's progress shown.
$(VENV)/.installed-%: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "make: installing smoledge into $(VENV) (editable: this clone is the package)"
	@$(BIN)/python -m pip install --quiet --no-deps -e .
	@echo "make: installing what smoledge[$*] needs ($(or $(SIZE_$*),see pyproject.toml))"
	$(BIN)/python -m pip install --progress-bar on "smoledge[$*]"
	@touch $@

demo: $(VENV)/.installed-export $(BUNDLE)/manifest.json
	$(BIN)/smoledge bundle info $(BUNDLE)
	$(BIN)/smoledge run $(BUNDLE) --image $(IMAGE) --prompt "$(PROMPT)" --max-new-tokens 48 --temperature 0 --stream --stats

$(BUNDLE)/manifest.json: $(VENV)/.installed-export $(EXPORT_SOURCES)
	@echo "make: building the real-text demo model (once; cached in the smoledge cache) and exporting $(BUNDLE)"
	$(BIN)/smoledge export "$$($(BIN)/smoledge demo-model)" --quant int4 --out $(BUNDLE)
	@touch $@

test: setup js-setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# llama-cpp-python is built from source for this CPU; scripts/llamacpp_cmake_args.sh leaves out llama.cpp's AMX
# kernels, which segfault at the first decode on AMX CPUs (llama.cpp #20824). A CMAKE_ARGS of your own wins.
$(VENV)/.installed-bench: export CMAKE_ARGS := $(or $(CMAKE_ARGS),$(shell scripts/llamacpp_cmake_args.sh))

bench: $(VENV)/.installed-bench
	$(BIN)/smoledge bench --size realtext

bench-full: $(VENV)/.installed-bench
	$(BIN)/smoledge bench --size full

# the light runtime on an emulated Raspberry Pi 5 (needs root, qemu-user-static, debootstrap; cached)
check-arm64: setup
	nice -n 10 scripts/check_arm64.sh

# The TypeScript runtime (runtime/js): Node deps from the lockfile; its suite runs inside `make test` too
# (tests/test_js_runtime.py writes the shared vectors from the Python runtime, then runs node --test).
js-setup: runtime/js/node_modules/.package-lock.json

runtime/js/node_modules/.package-lock.json: runtime/js/package-lock.json
	@if command -v npm >/dev/null; then cd runtime/js && npm ci --no-fund --no-audit; \
	else echo "npm not found: the TypeScript runtime's tests will be skipped (install Node 20+)"; fi

test-js: setup js-setup
	$(BIN)/python -m pytest -q tests/test_js_runtime.py

bench-js: setup js-setup
	cd runtime/js && npm run --silent build
	$(BIN)/python runtime/js/python/bench_decode.py

# clean keeps .venv and the smoledge cache (demo models, extracted zips, calibration, the cloud ledger)
clean:
	rm -rf bundles build *.egg-info .pytest_cache runtime/js/dist runtime/js/web runtime/js/out
	@cache="$$($(BIN)/python -c 'from smoledge.runtime.cache import cache_dir; print(cache_dir())' 2>/dev/null \
	    || echo "$${SMOLEDGE_CACHE_DIR:-$$HOME/.cache/smoledge}")"; \
	echo "make clean: kept $(VENV) ($$(du -sh $(VENV) 2>/dev/null | cut -f1 || echo absent)) and the smoledge cache" \
	    "$$cache ($$(du -sh "$$cache" 2>/dev/null | cut -f1 || echo empty));"; \
	echo "  'smoledge cache' shows what it holds, 'smoledge cache prune' removes what is safe to lose," \
	    "'make distclean' removes both"

# distclean: clean + the smoledge cache (demo models, calibration, the cloud usage ledger) + .venv
distclean: clean
	@cache="$$($(BIN)/python -c 'from smoledge.runtime.cache import cache_dir; print(cache_dir())' 2>/dev/null \
	    || echo "$${SMOLEDGE_CACHE_DIR:-$$HOME/.cache/smoledge}")"; \
	echo "make distclean: removing $$cache and $(VENV)"; rm -rf "$$cache" $(VENV)
