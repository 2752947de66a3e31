"""``smoledge bundle verify|info BUNDLE``."""

from __future__ import annotations

import argparse
import json


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = sub.add_parser("verify", help="check every file's size and sha256 against the manifest")
    verify.add_argument("bundle")
    info = sub.add_parser("info", help="describe the bundle")
    info.add_argument("bundle")
    info.add_argument("--json", action="store_true", help="print the whole manifest")


def main(args: argparse.Namespace) -> int:
    from smoledge.runtime.bundle import open_bundle

    bundle = open_bundle(args.bundle, verify=False)
    if args.action == "verify":
        checked = bundle.verify(full=True)
        print(f"ok: {len(checked)} files match the manifest of {bundle.path}")
        return 0
    if args.json:
        print(json.dumps(bundle.manifest, indent=2))
        return 0
    print(describe(bundle))
    return 0


def describe(bundle) -> str:
    m = bundle.manifest
    src, model, mem = m["source"], m["model"], m["memory"]
    lines = [
        f"bundle     {bundle.path}",
        f"source     {src['model_id']} @ {src.get('revision') or '-'}",
        f"model      {model['architecture']}: text {model['text']['num_hidden_layers']} layers x "
        f"{model['text']['hidden_size']}, vision {model['vision']['num_hidden_layers']} layers, "
        f"{model['vision']['image_size']} px tiles, {model['image_seq_len']} tokens per tile",
        f"context    {m['context_length']} tokens; KV cache {mem['kv_bytes_per_token']} bytes/token",
        f"images     longest edge {m['image']['longest_edge']}, splitting "
        f"{'on' if m['image']['do_image_splitting'] else 'off'}",
    ]
    for fmt, art in sorted(m["artifacts"].items()):
        lines.append(f"{fmt:<10} recipe {art.get('recipe', {}).get('name', '-')}, {art['weight_bytes'] / 1e6:.1f} MB")
        for name, part in (art.get("graphs") or art.get("models") or {}).items():  # ONNX graphs, Core ML models
            q = part.get("quantization", {})
            lines.append(f"  {name:<22} {part.get('precision', '-'):<40} {part.get('bytes', 0) / 1e6:8.1f} MB"
                         f"  {q.get('bits_per_weight', 0):.2f} bits/weight")
    lines.append(f"files      {len(m['files'])}, schema {m['schema_version']}, smoledge {m.get('smoledge_version')}")
    return "\n".join(lines)
