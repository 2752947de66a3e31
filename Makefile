# smoledge: two commands do all the set-up on a fresh machine.
#   make demo   build the real-text demo model, export an INT4 bundle, answer a question about an image
#   make test   run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev
BUNDLE ?= bundles/smolvlm-realtext-int4
IMAGE  ?= examples/house.png
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: setup demo test test-fast bench bench-full check-arm64 clean js-setup test-js bench-js

setup: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(BIN)/smoledge export "$$($(BIN)/smoledge demo-model)" --quant int4 --out $(BUNDLE)
	$(BIN)/smoledge bundle info $(BUNDLE)
	$(BIN)/smoledge run $(BUNDLE) --image $(IMAGE) --prompt "$(PROMPT)" --max-new-tokens 48 --stream --stats

test: setup js-setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench bench-full: EXTRAS = bench

bench: setup
	$(BIN)/smoledge bench --size realtext

bench-full: setup
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

clean:
	rm -rf bundles build *.egg-info .pytest_cache runtime/js/dist runtime/js/web runtime/js/out
