"""llama.cpp through llama-cpp-python, on the same weights converted to GGUF (Q4_0 and Q4_K_M).

``prepare`` writes the text decoder as an F16 GGUF and the vision tower + connector as an idefics3
mmproj (:mod:`smoledge.benchmarks.gguf_convert`), then quantizes with llama.cpp's own
``llama_model_quantize``.  Two mmprojs are made: one without ``preproc_image_size`` for the ``image``
case (no upscaling; llama.cpp's idefics3 preprocessing still adds an overview, so a one-tile picture
costs it two tiles -- the report shows tile counts) and one with it for the ``split`` case (tiles +
global image as SmolVLM splits).  Images go through libmtmd (``mtmd_tokenize`` = preprocessing,
``mtmd_helper_eval_chunks`` = vision encode + prefill), text through ``Llama.eval``; tokens are
picked by argmax over the last logits.
"""

from __future__ import annotations

import ctypes
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from smoledge.benchmarks.peers import Case, Engine, FirstToken, PrepareContext, Subject, missing_packages

NAME = "llamacpp"
QUANTS = ("Q4_0", "Q4_K_M")
N_BATCH = 512


def missing() -> str | None:
    return missing_packages("llama_cpp", "gguf")


def _cached(path: Path, make) -> Path:
    if not path.is_file():
        make(path)
    return path


def _mtmd_available() -> bool:
    try:
        from llama_cpp import mtmd_cpp  # noqa: F401  (loads libmtmd)
    except (ImportError, OSError, AttributeError):
        return False
    return True


def prepare(ctx: PrepareContext, quants: tuple[str, ...] = QUANTS) -> list[Subject]:
    from smoledge.benchmarks.gguf_convert import (gguf_bits_per_weight, quantize_gguf, write_mmproj_gguf,
                                                   write_text_gguf)

    folder = ctx.work_dir / "gguf"
    f16 = _cached(folder / "text-F16.gguf", lambda p: write_text_gguf(ctx.model_dir, p))
    options, notes = {}, ["text decoder converted from the HF weights with the gguf writer, quantized by "
                          "llama_model_quantize"]
    if _mtmd_available():
        longest = _processor_longest_edge(ctx.model_dir)
        options["mmproj"] = str(_cached(folder / "mmproj-Q8_0.gguf", lambda p: write_mmproj_gguf(ctx.model_dir, p)))
        options["mmproj_split"] = str(_cached(folder / f"mmproj-Q8_0-split{longest}.gguf", lambda p: write_mmproj_gguf(
            ctx.model_dir, p, preproc_image_size=longest)))
        notes.append("vision: idefics3 mmproj (linear weights Q8_0, rest F16/F32) through libmtmd")
    else:
        notes.append("vision: not measured (this llama-cpp-python has no libmtmd)")
    subjects = []
    for quant in quants:
        path = _cached(folder / f"text-{quant}.gguf", lambda p, q=quant: quantize_gguf(f16, p, q, ctx.threads))
        mmproj = Path(options["mmproj"]).stat().st_size if "mmproj" in options else 0
        n_ctx = max(1024, -(-ctx.max_tokens // 256) * 256)  # no bigger than needed: KV is allocated up front
        subjects.append(Subject(name=f"llama.cpp {quant}", peer=NAME, artifact=str(path),
                                options={**options, "quant": quant, "n_ctx": n_ctx,
                                         "image_seq_len": _image_seq_len(ctx.model_dir)},
                                size_bytes=path.stat().st_size + mmproj,
                                bits_per_weight=gguf_bits_per_weight(path), notes=tuple(notes)))
    return subjects


def _image_seq_len(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    vision = config["vision_config"]
    return (vision["image_size"] // vision["patch_size"] // config.get("scale_factor", 1)) ** 2


def _processor_longest_edge(model_dir: Path) -> int | None:
    """The image processor's ``size.longest_edge`` (transformers 5 keeps it in processor_config.json)."""
    for name, section in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        try:
            config = json.loads((model_dir / name).read_text())
        except (OSError, ValueError):
            continue
        config = config.get(section, {}) if section else config
        if (config.get("size") or {}).get("longest_edge"):
            return int(config["size"]["longest_edge"])
    return None


class LlamaCppEngine(Engine):
    def __init__(self, subject: Subject, threads: int, fidelity: bool = False):
        from llama_cpp import Llama

        self.llm = Llama(model_path=subject.artifact, n_ctx=int(subject.options.get("n_ctx", 4096)),
                         n_threads=threads, n_threads_batch=threads, n_batch=N_BATCH, n_ubatch=N_BATCH,
                         n_gpu_layers=0, logits_all=fidelity, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.threads = threads
        self.mmproj = {False: subject.options.get("mmproj"), True: subject.options.get("mmproj_split")}
        self.image_seq_len = int(subject.options.get("image_seq_len") or 0)
        self._mtmd = {}
        self.supports_images = bool(self.mmproj[False])
        self.supports_split = bool(self.mmproj[True])

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))

    def first_token(self, case: Case) -> FirstToken | None:
        if case.image:
            return self._first_token_image(case) if self.mmproj[case.split] else None
        start = time.perf_counter()
        self.llm.reset()
        self.llm.eval(list(case.prompt_ids))
        int(self._last_logits().argmax())
        return FirstToken(time.perf_counter() - start, prompt_tokens=len(case.prompt_ids))

    def _context(self, split: bool):
        from llama_cpp import mtmd_cpp

        if split not in self._mtmd:
            from llama_cpp._logger import llama_log_callback  # llama-cpp-python's filter (verbose=False: errors)

            mtmd_cpp.mtmd_log_set(llama_log_callback, ctypes.c_void_p(0))
            mtmd_cpp.mtmd_helper_log_set(llama_log_callback, ctypes.c_void_p(0))
            params = mtmd_cpp.mtmd_context_params_default()
            params.use_gpu, params.n_threads, params.print_timings = False, self.threads, False
            ctx = mtmd_cpp.mtmd_init_from_file(self.mmproj[split].encode(), self.llm.model, params)
            if not ctx:
                raise RuntimeError(f"libmtmd could not load {self.mmproj[split]}")
            self._mtmd[split] = ctx
        return self._mtmd[split]

    def _first_token_image(self, case: Case) -> FirstToken:
        from llama_cpp import llama_cpp as C
        from llama_cpp import mtmd_cpp as M

        mctx = self._context(case.split)
        start = time.perf_counter()
        bitmap = M.mtmd_helper_bitmap_init_from_file(mctx, case.image.encode(), False)
        prompt = case.chat_text.replace("<image>", M.mtmd_default_marker().decode()).encode()
        text = M.mtmd_input_text(prompt, len(prompt), False, True)
        chunks = M.mtmd_input_chunks_init()
        try:
            bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if M.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise RuntimeError("mtmd_tokenize failed")
            preprocess = time.perf_counter() - start
            every = [M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks))]
            tokens = sum(M.mtmd_input_chunk_get_n_tokens(c) for c in every)
            image_tokens = sum(M.mtmd_input_chunk_get_n_tokens(c) for c in every
                               if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE)
            tiles = image_tokens // self.image_seq_len if self.image_seq_len else 0
            self.llm.reset()
            C.llama_memory_clear(C.llama_get_memory(self.llm.ctx), False)
            n_past = C.llama_pos(0)
            if M.mtmd_helper_eval_chunks(mctx, self.llm.ctx, chunks, 0, 0, N_BATCH, True, ctypes.byref(n_past)):
                raise RuntimeError("mtmd_helper_eval_chunks failed")
            int(self._last_logits().argmax())
            ttft = time.perf_counter() - start
        finally:
            M.mtmd_input_chunks_free(chunks)
            M.mtmd_bitmap_free(bitmap)
        return FirstToken(ttft, preprocess, None, int(tiles), int(tokens))

    def vision_seconds_per_tile(self, image: str, repeats: int) -> float | None:
        """``mtmd_encode_chunk`` on the image chunk of a one-tile picture."""
        from llama_cpp import mtmd_cpp as M

        if not self.mmproj[False]:
            return None
        mctx = self._context(False)
        bitmap = M.mtmd_helper_bitmap_init_from_file(mctx, image.encode(), False)
        prompt = M.mtmd_default_marker()
        text = M.mtmd_input_text(prompt, len(prompt), False, True)
        chunks = M.mtmd_input_chunks_init()
        try:
            if M.mtmd_tokenize(mctx, chunks, ctypes.byref(text), (M.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) != 0:
                raise RuntimeError("mtmd_tokenize failed")
            every = (M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks)))
            chunk = next(c for c in every if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                if M.mtmd_encode_chunk(mctx, chunk) != 0:
                    raise RuntimeError("mtmd_encode_chunk failed")
                times.append(time.perf_counter() - start)
        finally:
            M.mtmd_input_chunks_free(chunks)
            M.mtmd_bitmap_free(bitmap)
        return float(np.median(times))

    def generate(self, ids: list[int], new_tokens: int) -> Iterator[int]:
        self.llm.reset()
        self.llm.eval(list(ids))
        for i in range(new_tokens):
            token = int(self._last_logits().argmax())
            yield token
            if i + 1 < new_tokens:
                self.llm.eval([token])

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)


def open_engine(subject: Subject, threads: int, fidelity: bool = False) -> LlamaCppEngine:
    return LlamaCppEngine(subject, threads, fidelity)
