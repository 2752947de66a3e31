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
        print(json.dumps(bundle.manifest.to_dict(), indent=2))
        return 0
    print(describe(bundle))
    return 0


def describe(bundle) -> str:
    m = bundle.manifest
    src, text, vision, mem = m.source, m.model.text, m.model.vision, m.memory
    lines = [
        f"bundle     {bundle.path}",
        f"source     {src.model_id} @ {src.revision or '-'}",
        f"model      {m.model.architecture}: text {text.num_hidden_layers} layers x {text.hidden_size}, vision "
        f"{vision.num_hidden_layers} layers, {vision.image_size} px tiles, {m.model.image_seq_len} tokens per tile",
        f"context    {m.context_length} tokens; KV cache {mem.kv_bytes_per_token} bytes/token",
        f"images     longest edge {m.image.longest_edge}, splitting {'on' if m.image.do_image_splitting else 'off'}",
    ]
    for fmt, art in sorted(m.artifacts.items()):
        lines.append(f"{fmt:<10} recipe {art.recipe_name or '-'}, {art.weight_bytes / 1e6:.1f} MB, "
                     f"KV capacity {art.capacity(m.context_length)} tokens")
        for name, graph in art.graphs.items():
            bits = graph.bits_per_weight
            where = graph.file + (f":{graph.method}" if graph.method else "")
            size = f"  {graph.bytes / 1e6:8.1f} MB" if graph.bytes is not None else ""
            lines.append(f"  {name:<15} {where:<36} {graph.precision or getattr(art, 'precision', '-'):<36}{size}"
                         + (f"  {bits:.2f} bits/weight" if bits is not None else ""))
    lines.append(f"files      {len(m.files)}, schema {m.schema_version}, smoledge {m.smoledge_version}")
    return "\n".join(lines)
