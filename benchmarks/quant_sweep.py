"""The recipe sweep behind docs/quantization.md:
``python -m smoledge.benchmarks.quant_sweep [--only NAME ...]``.

For each candidate recipe, the real-text model's embedding and decoder graphs are quantized exactly as
``smoledge export`` does (trace once, quantize, fuse for ONNX Runtime) and scored teacher-forced against
the fp32 graphs on texts the calibration never saw (``quantize/fidelity_text.txt`` and
``docs/quant-heldout-text.txt``): KL(fp32 || quant), top-1 agreement, bits per weight over embedding +
decoder (scales and zero points counted, lm_head included) and decode speed (ms per token at a
128-token context, median of 24 steps).  Every intermediate is cached under ``--work``; results are
appended to ``<work>/results.jsonl`` and a candidate already there is skipped.  Slow (minutes per
calibrated candidate on two cores): a development tool, not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from smoledge.fidelity import TEXT_FILE, compare_logits
from smoledge.quantize.recipe import QuantReport, Recipe, load_recipe

REPO_DOCS = Path(__file__).resolve().parent.parent / "docs"
SCORED_TEXTS = (TEXT_FILE, REPO_DOCS / "quant-heldout-text.txt")
GRAPHS = ("embed_tokens", "decoder_model_merged")
EMBED = "model.text_model.embed_tokens"


MORE_BITS = "use_more_bits"  # llama.cpp's layer selector (quantize/recipe.py), resolved at quantization


def rule(match: str, bits=4, block=32, symmetric=True, algorithm="rtn", **extra) -> dict:
    return {"match": match, "scheme": {"bits": bits, "block_size": block, "symmetric": symmetric,
                                       "algorithm": algorithm, **extra}}


def mixed(name: str, algorithm: str, head_block: int = 64, more_bits=MORE_BITS, symmetric: bool = True,
          v_bits: int = 8, head_symmetric: bool | None = None, **extra) -> Recipe:
    """4-bit symmetric block 64, with v_proj 8-bit, down_proj 8-bit in the ``more_bits`` layers (a layer
    selector, or None for none) and block 32 in the others, lm_head 4-bit at ``head_block``, the embedding
    4-bit symmetric block 64.  ``symmetric=False``: the 4-bit block-64 rules (lm_head and the body) get uint4
    zero points; the 8-bit and block-32 rules stay symmetric (block 32 with zero points could come close
    to the source's Q4_1 grid).  ``v_bits=4``: v_proj 4-bit block 64 like the body; ``head_symmetric`` overrides lm_head's."""
    body = lambda match, bits=4, block=64, sym=True: rule(match, bits, block, sym, algorithm, **extra)  # noqa: E731
    if isinstance(more_bits, tuple):  # explicit layer indices
        more = [body(f"*.layers.{i}.mlp.down_proj", 8, 64) for i in more_bits]
    else:
        more = [{**body("*.mlp.down_proj", 8, 64), "layers": more_bits}] if more_bits else []
    head_symmetric = symmetric if head_symmetric is None else head_symmetric
    rules = [rule(EMBED, 4, 64, True), body("lm_head", 4, head_block, head_symmetric), body("*.self_attn.v_proj", v_bits, 64, symmetric or v_bits == 8),
             *more, body("*.mlp.down_proj", 4, 32), body("*", sym=symmetric)]
    return Recipe.from_dict({"name": name, "rules": rules})


def candidate(name: str, body: dict, *first: dict, embed: dict | None = None, head: dict | None = None) -> Recipe:
    """Embedding, lm_head, then ``first`` rules, then ``body`` for every other decoder linear."""
    rules = [embed or rule(EMBED, 4, 32, False), head or {**body, "match": "lm_head"}, *first,
             {**body, "match": "*"}]
    return Recipe.from_dict({"name": name, "rules": rules})


def candidates() -> dict[str, Recipe]:
    """In the order the sweep runs them (most informative first)."""
    e128, head8 = rule(EMBED, 4, 128, False), rule("lm_head", 8, 128, True)
    act = {"act_order": True}
    out = {"gptq act-order sym b32, embed sym b32": candidate("gptq-act-b32", rule("*", 4, 32, True, "gptq", **act),
                                                              embed=rule(EMBED, 4, 32, True)),
           "mixed gptq act-order: b64, v 8-bit, down 8-bit x14 / b32": mixed("mixed-gptq", "gptq", **act),
           "mixed rtn: b64, v 8-bit, down 8-bit x14 / b32": mixed("mixed-rtn", "rtn"),
           "mixed gptq act-order, uint4 zero points at b64": mixed("mixed-gptq-zp", "gptq", symmetric=False, **act),
           "mixed gptq act-order, uint4 zp b64, lm_head b32 zp, v_proj 4-bit": mixed(
               "mixed-gptq-zp-h32-v4", "gptq", 32, symmetric=False, v_bits=4, **act),
           "mixed gptq act-order, uint4 zp b64, lm_head b32 sym, no 8-bit down": mixed(
               "mixed-gptq-zp-h32", "gptq", 32, None, symmetric=False, head_symmetric=True, **act),
           "mixed gptq act-order, uint4 zp b64, lm_head b16 sym, no 8-bit down": mixed(
               "mixed-gptq-zp-h16", "gptq", 16, None, symmetric=False, head_symmetric=True, **act),
           "mixed gptq act-order, uint4 zp b64, lm_head b32 sym, 8-bit down in the first/last eighth": mixed(
               "mixed-gptq-zp-h32-d7", "gptq", 32, (0, 1, 2, 26, 27, 28, 29), symmetric=False, head_symmetric=True, **act),
           "int4-mixed": load_recipe("int4-mixed"),
           "int4-mixed's layout by rtn (what ExecuTorch / Core ML take)": mixed(
               "mixed-rtn-zp-h32-d7", "rtn", 32, (0, 1, 2, 26, 27, 28, 29), symmetric=False, head_symmetric=True),
           "mixed gptq act-order, lm_head b32, no 8-bit down": mixed("mixed-gptq-h32", "gptq", 32, None, **act),
           "int4-gptq: gptq sym b32, embed sym b32": load_recipe("int4-gptq")}
    g64 = rule("*", 4, 64, True, "gptq")
    out["gptq sym b64, v/down gptq b32, embed sym b64"] = candidate(
        "gptq-b64-vd32", g64, rule("*.self_attn.v_proj", 4, 32, True, "gptq"),
        rule("*.mlp.down_proj", 4, 32, True, "gptq"), embed=rule(EMBED, 4, 64, True))
    out["int4 (the default before int4-mixed): rtn, lm_head / v / down 8-bit"] = load_recipe("int4")
    for algo in ("gptq", "rtn", "importance"):
        out[f"{algo} sym b128, lm_head int8 b128, embed b128"] = candidate(
            f"{algo}-b128-head8", rule("*", 4, 128, True, algo), head=head8, embed=e128)
    out["importance sym b32, embed sym b32"] = candidate("importance-sym-b32", rule("*", 4, 32, True, "importance"),
                                                         embed=rule(EMBED, 4, 32, True))
    out["gptq sym b64, embed sym b64"] = candidate("gptq-sym-b64", g64, embed=rule(EMBED, 4, 64, True))
    out["hqq float-zp b32"] = candidate("hqq-b32", rule("*", 4, 32, False, "hqq"))
    out["k-quant uint4zp b32"] = candidate("kq-b32", rule("*", 4, 32, False, "k-quant"))
    out["int4-sym-rtn"] = load_recipe("int4-sym-rtn")
    for algo in ("rtn", "gptq"):
        out[f"{algo} uint4zp b64"] = candidate(f"{algo}-zp-b64", rule("*", 4, 64, False, algo))
    return out


class Workspace:
    """Traced fp32 graphs, calibration activations and reference logits, each built once."""

    def __init__(self, work: Path):
        from smoledge.export.realtext_model import ensure_realtext_model

        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.model_dir = ensure_realtext_model()
        self.tokenizer = self.model_dir / "tokenizer.json"
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from smoledge.export.loader import load_model, resolve

            self._model = load_model(resolve(str(self.model_dir), None))
        return self._model

    def raw_graph(self, name: str) -> Path:
        path = self.work / "raw" / f"{name}.onnx"
        if not path.exists():
            from smoledge.export.onnx_export import EXPORTERS, OnnxExportConfig, name_weight_nodes, save

            program, spec = EXPORTERS[name](self.model, OnnxExportConfig())
            name_weight_nodes(program, name)
            path.parent.mkdir(exist_ok=True)
            save(program, path)
            path.with_suffix(".fused").write_text("1" if spec.fused else "0")
        return path

    def fused(self, name: str) -> bool:
        """Whether the exporter built the graph already fused (the GroupQueryAttention decoder)."""
        flag = self.raw_graph(name).with_suffix(".fused")
        return flag.exists() and flag.read_text() == "1"

    def calibration(self, recipe: Recipe):
        from smoledge.quantize.calibration import CalibrationStats, collect_for, source_key

        if recipe.calibration is None:
            return None
        # keyed as export keys calibrated results: collect's version, the model, tokenizer, text and tokens
        path = self.work / f"calibration-{source_key(self.model, recipe.calibration, self.tokenizer)[:16]}.npz"
        if path.exists():
            return CalibrationStats.load(path)
        stats = collect_for(self.model, recipe, self.tokenizer)
        stats.save(path)
        return stats

    def build(self, recipe: Recipe, tag: str) -> tuple[dict[str, Path], dict[str, dict]]:
        """Quantize + fuse both text graphs; returns their paths and quantization reports."""
        import onnx
        import onnx_ir as ir

        from smoledge.export.onnx_export import fuse_for_onnxruntime, save
        from smoledge.quantize.onnx_quant import quantize_model

        stats = self.calibration(recipe)
        paths, reports = {}, {}
        for name in GRAPHS:
            proto, report = quantize_model(onnx.load(str(self.raw_graph(name))), recipe, stats)
            out = self.work / "built" / tag
            out.mkdir(parents=True, exist_ok=True)
            q = out / f"{name}.q.onnx"
            onnx.save(proto, str(q), save_as_external_data=True, location=f"{name}.q.onnx.data")
            program = ir.load(str(q))
            fuse_for_onnxruntime(program, None if self.fused(name) else "cpu")
            paths[name] = save(program, out / f"{name}.onnx")[0]
            reports[name] = report.to_dict()
        return paths, reports


def _sessions(paths: dict[str, Path]):
    import onnxruntime as ort

    return {name: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for name, p in paths.items()}


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _feeds(decoder, embeds: np.ndarray, past_length: int) -> dict:
    """Decoder inputs for ``embeds`` after ``past_length`` cached (zero) positions, in either decoder
    layout: a traced one (past of the cached length, ``position_ids``) or the built GroupQueryAttention one
    (one preallocated KV buffer per layer of at least the total length, ``logits_to_keep``)."""
    total = past_length + embeds.shape[1]
    names = {inp.name: inp for inp in decoder.get_inputs()}
    shared = "logits_to_keep" in names
    feed = {"inputs_embeds": embeds, "attention_mask": np.ones((1, total), np.int64)}
    if "position_ids" in names:
        feed["position_ids"] = np.arange(past_length, total, dtype=np.int64)[None]
    if shared:
        feed["logits_to_keep"] = np.asarray([embeds.shape[1]], np.int64)
    for name, inp in names.items():
        if name.startswith("past_key_values."):
            _, heads, _, dim = inp.shape
            feed[name] = np.zeros((1, heads, total if shared else past_length, dim), _NP_TYPES.get(inp.type, np.float32))
    return feed


def logits(sessions, ids: list[int]) -> np.ndarray:
    emb = sessions["embed_tokens"].run(None, {"input_ids": np.asarray([ids], np.int64)})[0]
    dec = sessions["decoder_model_merged"]
    return dec.run(["logits"], _feeds(dec, emb, 0))[0][0]


def decode_ms(sessions, context: int = 128, steps: int = 24) -> float:
    dec = sessions["decoder_model_merged"]
    hidden = dec.get_inputs()[0].shape[-1]
    emb = np.random.default_rng(0).normal(0, 0.02, (1, 1, hidden)).astype(np.float32)
    feed = _feeds(dec, emb, context)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        dec.run(["logits"], feed)
        times.append(time.perf_counter() - start)
        del i
    return 1000 * float(np.median(times))


def scored_ids(ws: Workspace, max_tokens: int) -> dict[str, list[int]]:
    """The token ids every candidate (ours and llama.cpp's) is scored on, per scored text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ws.tokenizer))
    return {p.name: tok.encode(p.read_text()).ids[:max_tokens] for p in SCORED_TEXTS}


def reference_logits(ws: Workspace, max_tokens: int):
    """The fp32 graphs' logits on :func:`scored_ids` (cached)."""
    ref_path = ws.work / f"reference-{max_tokens}.npz"
    if not ref_path.exists():
        ref = _sessions({n: ws.raw_graph(n) for n in GRAPHS})
        np.savez(ref_path, **{name: logits(ref, ids) for name, ids in scored_ids(ws, max_tokens).items()})
    return np.load(ref_path)


def pooled_score(refs, candidate_logits: dict) -> dict:
    """KL / top-1 per text and pooled over every position; ``candidate_logits``: text name -> [T, vocab]."""
    per_text = {}
    for name, got in candidate_logits.items():
        f = compare_logits(refs[name], got)
        per_text[name] = {"kl": round(f.kl_mean, 4), "top1": round(f.top1_agreement, 4), "positions": f.positions}
    total = sum(t["positions"] for t in per_text.values())
    pooled = {k: round(sum(t[k] * t["positions"] for t in per_text.values()) / total, 4) for k in ("kl", "top1")}
    return {**pooled, "texts": per_text}


def score(ws: Workspace, sessions, max_tokens: int) -> dict:
    refs = reference_logits(ws, max_tokens)
    return pooled_score(refs, {name: logits(sessions, ids) for name, ids in scored_ids(ws, max_tokens).items()})


def run_one(ws: Workspace, label: str, recipe: Recipe, max_tokens: int) -> dict:
    tag = "".join(c if c.isalnum() else "-" for c in label)
    start = time.perf_counter()
    paths, reports = ws.build(recipe, tag)
    built = time.perf_counter() - start
    sessions = _sessions(paths)
    bpw = QuantReport.combined(QuantReport.from_dict(r) for r in reports.values()).bits_per_weight
    return {"candidate": label, "recipe": recipe.to_dict(), **score(ws, sessions, max_tokens),
            "bits_per_weight": round(bpw, 3), "decode_ms": round(decode_ms(sessions), 2),
            "quantize_s": round(built, 1), "graphs": reports}


VISION = "model.vision_model.*"
VISION_MLP = "model.vision_model.*.mlp.*"  # fc1 / fc2: ~65% of the tower's linear weights


def _vision(mlp: tuple[int, int], rest: tuple[int, int], connector: tuple[int, int] | None = None) -> list[dict]:
    """Rules for the vision tower and connector: (bits, block) for the MLP, the rest (attention) and the
    connector (default: as the rest)."""
    return [rule(VISION_MLP, *mlp), rule(VISION, *rest), rule("model.connector.*", *(connector or rest))]


VISION_CANDIDATES = {
    "int8 sym b32": _vision((8, 32), (8, 32)), "int8 sym b64": _vision((8, 64), (8, 64)),
    "int4 sym b32": _vision((4, 32), (4, 32)), "int4 sym b64": _vision((4, 64), (4, 64)),
    "mlp int4 b32, attn + connector int8 b32": _vision((4, 32), (8, 32)),
    "mlp int4 b32, attn + connector int8 b64": _vision((4, 32), (8, 64)),
    "mlp int4 b64, attn + connector int8 b64": _vision((4, 64), (8, 64)),
    "mlp + connector int4 b32, attn int8 b64": _vision((4, 32), (8, 64), (4, 32)),
}


def vision_rows(ws: Workspace, only: list[str] | None = None) -> list[dict]:
    """Vision encoder + connector by RTN at each candidate precision: image-feature cosine against fp32 on
    the fidelity report's synthetic tiles, bits per weight and ms per tile.  The real-text model's vision
    tower is seeded random (export/realtext_model.py), so this measures the quantizer's error on that
    tower's weights, not on a trained SigLIP's."""
    import onnx

    from smoledge.fidelity import _cosine, _tiles
    from smoledge.quantize.onnx_quant import quantize_model

    raw = ws.raw_graph("vision_encoder")
    pixels, mask = _tiles(ws.model.config.vision_config.image_size)
    ref = _sessions({"v": raw})["v"].run(None, {"pixel_values": pixels, "pixel_attention_mask": mask})[0]
    rows = []
    for label, rules in VISION_CANDIDATES.items():
        if only and label not in only:
            continue
        recipe = Recipe.from_dict({"name": label, "rules": [rule("*position_embedding", None), *rules]})
        proto, report = quantize_model(onnx.load(str(raw)), recipe)
        tag = "".join(c if c.isalnum() else "-" for c in label)
        path = ws.work / "built" / f"vision-{tag}.onnx"
        path.parent.mkdir(exist_ok=True)
        onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")
        sess = _sessions({"v": path})["v"]
        start = time.perf_counter()
        got = sess.run(None, {"pixel_values": pixels, "pixel_attention_mask": mask})[0]
        rows.append({"candidate": f"vision {label}", "cosine": round(_cosine(ref, got), 5),
                     "bits_per_weight": round(report.bits_per_weight, 3),
                     "ms_per_tile": round(1000 * (time.perf_counter() - start) / len(pixels), 1)})
        print(rows[-1], flush=True)
    return rows


LAYER_ALGORITHMS = {  # label -> scheme (block 32, 4-bit): onnxruntime's quantizers beside ours, on the same layers
    "rtn sym (onnxruntime)": {"symmetric": True}, "rtn uint4 zp (onnxruntime)": {"symmetric": False},
    "k-quant (onnxruntime)": {"symmetric": False, "algorithm": "k-quant"},
    "hqq float zp (onnxruntime)": {"symmetric": False, "algorithm": "hqq"},
    "importance sym (ours)": {"symmetric": True, "algorithm": "importance"},
    "gptq sym (ours)": {"symmetric": True, "algorithm": "gptq"},
    "gptq act-order sym (ours)": {"symmetric": True, "algorithm": "gptq", "act_order": True},
}


def layer_rows(ws: Workspace, layers=(0, 15, 29)) -> list[dict]:
    """Every linear of three decoder layers, each algorithm at 4-bit block 32: relative output error
    ||XW - XW_q||^2 / ||XW||^2 on the activations of the scored text (which the calibration never saw)."""
    import onnx
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer

    from smoledge.quantize.onnx_quant import quantize_model

    names = [f"model.text_model.layers.{i}.{p}" for i in layers for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")]
    modules = dict(ws.model.named_modules())
    held_out, hooks = {}, []
    for name in names:
        hooks.append(modules[name].register_forward_pre_hook(
            lambda _m, args, name=name: held_out.__setitem__(name, args[0][0].numpy().copy())))
    ids = torch.tensor([Tokenizer.from_file(str(ws.tokenizer)).encode(TEXT_FILE.read_text()).ids[:256]])
    with torch.no_grad():
        ws.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for h in hooks:
        h.remove()
    weights = {n: modules[n].weight.detach().numpy().T.copy() for n in names}
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"], name=n) for i, n in enumerate(names)], "lin",
        [onnx.helper.make_tensor_value_info(f"x{i}", onnx.TensorProto.FLOAT, [None, weights[n].shape[0]])
         for i, n in enumerate(names)],
        [onnx.helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, [None, weights[n].shape[1]])
         for i, n in enumerate(names)],
        [onnx.numpy_helper.from_array(weights[n], f"w{i}") for i, n in enumerate(names)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
    stats = ws.calibration(load_recipe("int4-gptq"))
    rows = []
    for label, extra in LAYER_ALGORITHMS.items():
        recipe = Recipe.from_dict({"name": label, "rules": [rule("*", 4, 32, **extra)]})
        proto, report = quantize_model(onnx.ModelProto.FromString(model.SerializeToString()), recipe, stats)
        got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {f"x{i}": held_out[n] for i, n in enumerate(names)})
        err = {n: float(np.sum((held_out[n] @ weights[n] - y) ** 2) / np.sum((held_out[n] @ weights[n]) ** 2))
               for n, y in zip(names, got)}
        by_kind = {p: round(float(np.mean([v for n, v in err.items() if n.endswith(p)])), 5)
                   for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
        rows.append({"candidate": f"layers {label}", "mean_rel_error": round(float(np.mean(list(err.values()))), 5),
                     "bits_per_weight": round(report.bits_per_weight, 3), "by_kind": by_kind})
        print(rows[-1], flush=True)
    return rows


HEAD_SPLITS = {  # name -> lm_head's scheme in int4-mixed's layout (the rest of the recipe as it is)
    "4-bit sym b32": {"bits": 4, "block_size": 32, "symmetric": True},
    "4-bit b64 uint4 zp": {"bits": 4, "block_size": 64, "symmetric": False},
    "8-bit sym b32": {"bits": 8, "block_size": 32, "symmetric": True},
    "8-bit sym b64": {"bits": 8, "block_size": 64, "symmetric": True},
}
HEAD_PAIRS = (("8-bit sym b64", "4-bit sym b32"), ("8-bit sym b64", "4-bit b64 uint4 zp"),
              ("8-bit sym b32", "4-bit sym b32"))
HEAD_ROWS = (2048, 4096, 6144, 8192, 12288)


def head_rows_rows(ws: Workspace, max_tokens: int) -> list[dict]:
    """lm_head split by token rows (docs/quantization.md, "lm_head split by token rows"): ``int4-mixed``
    with a whole lm_head in each of :data:`HEAD_SPLITS`, then every split "rows [0, R) as A, the rest as B"
    scored by taking logit columns [0, R) from A's graphs and the rest from B's.  That is exactly the split
    graph's output: the body is the same in every variant (per-layer GPTQ on the fp32 model's Hessians),
    and GPTQ rounds each output row on its own grid, compensating along the input dimension only."""
    base = load_recipe("int4-mixed").to_dict()
    at = next(i for i, r in enumerate(base["rules"]) if r["match"] == "lm_head")  # where lm_head's rules sit
    rules = [r for r in base["rules"] if r["match"] != "lm_head"]
    refs, ids = reference_logits(ws, max_tokens), scored_ids(ws, max_tokens)
    logits_of, bits_of, rows = {}, {}, []
    for name, head in HEAD_SPLITS.items():
        scheme = {**head, "algorithm": "gptq", "act_order": True}
        recipe = Recipe.from_dict({"name": f"int4-mixed-head-{name}", "calibration": base.get("calibration"),
                                   "rules": [*rules[:at], {"match": "lm_head", "scheme": scheme}, *rules[at:]]})
        paths, reports = ws.build(recipe, "head-" + "".join(c if c.isalnum() else "-" for c in name))
        sessions = _sessions(paths)
        logits_of[name] = {text: logits(sessions, t) for text, t in ids.items()}
        bits_of[name] = QuantReport.combined(QuantReport.from_dict(r) for r in reports.values()).bits_per_weight
        rows.append({"candidate": f"lm_head {name}", **pooled_score(refs, logits_of[name]),
                     "bits_per_weight": round(bits_of[name], 3)})
    vocab = next(iter(logits_of.values()))[next(iter(ids))].shape[-1]
    for high, low in HEAD_PAIRS:
        for r in HEAD_ROWS:
            mixed = {t: np.concatenate([logits_of[high][t][:, :r], logits_of[low][t][:, r:]], axis=1) for t in ids}
            bits = bits_of[low] + (bits_of[high] - bits_of[low]) * r / vocab
            rows.append({"candidate": f"lm_head rows 0-{r - 1} {high}, rest {low}", **pooled_score(refs, mixed),
                         "bits_per_weight": round(bits, 3)})
    for row in rows:
        print(f"{row['candidate']:60s} KL {row['kl']:.4f} top-1 {100 * row['top1']:.1f}% "
              f"{row['bits_per_weight']:.3f} bpw", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/smoledge-quant-sweep"))
    parser.add_argument("--only", nargs="*", help="candidate labels (default: all)")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--vision", action="store_true", help="score the vision encoder's candidates instead")
    parser.add_argument("--layers", action="store_true", help="compare every algorithm on the same linears instead")
    parser.add_argument("--head-rows", action="store_true", help="score lm_head split by token rows instead")
    args = parser.parse_args(argv)
    ws = Workspace(args.work)
    if args.head_rows:
        with (args.work / "head-rows.jsonl").open("a") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in head_rows_rows(ws, args.max_tokens))
        return 0
    if args.vision:
        with (args.work / "vision.jsonl").open("a") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in vision_rows(ws, args.only))
        return 0
    if args.layers:
        with (args.work / "layers.jsonl").open("a") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in layer_rows(ws))
        return 0
    results = args.work / "results.jsonl"
    done = {json.loads(line)["candidate"] for line in results.read_text().splitlines()} if results.exists() else set()
    for label, recipe in candidates().items():
        if (args.only and label not in args.only) or label in done:
            continue
        row = run_one(ws, label, recipe, args.max_tokens)
        with results.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{label:40s} KL {row['kl']:.4f} top-1 {100 * row['top1']:.1f}% {row['bits_per_weight']:.2f} bpw "
              f"{row['decode_ms']:.1f} ms/token", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
