"""``smoledge export MODEL --format onnx --quant int4-mixed --out DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path

from smoledge.quantize.recipe import DEFAULT_RECIPE, builtin_recipes
from smoledge.runtime.formats import FORMATS, dest


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="hub id (e.g. HuggingFaceTB/SmolVLM2-2.2B-Instruct) or a local checkpoint folder")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit); ignored for a local folder")
    parser.add_argument("--adapter", metavar="PATH_OR_HUB_ID",
                        help="PEFT LoRA adapter to merge into the weights before export (recorded in the manifest)")
    parser.add_argument("--adapter-revision", help="hub revision of --adapter; ignored for a local folder")
    parser.add_argument("--format", dest="formats", action="append", choices=list(FORMATS),
                        help="artifact format to add to the bundle (repeatable; default onnx)")
    parser.add_argument("--quant", default=DEFAULT_RECIPE,
                        help=f"quantization recipe: {', '.join(builtin_recipes())} or a recipe .json (default "
                        f"{DEFAULT_RECIPE}; a format that cannot take its grids uses the recipe its \"formats\" names)")
    parser.add_argument("--vision-precision", choices=["fp32", "int8", "int4"],
                        help="override the recipe for the vision encoder and connector")
    added = set()
    for spec in FORMATS.values():  # each target's own flags, from the format registry (--context: one for all)
        for flag in spec.export_flags:
            if flag.flag not in added:
                parser.add_argument(flag.flag, default=flag.default, choices=list(flag.choices) or None,
                                    help=flag.help)
                added.add(flag.flag)
    for old, (_fmt, new) in DEPRECATED_FLAGS.items():  # hidden: still accepted, with a one-line notice
        parser.add_argument(old, dest=_deprecated_dest(old), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cloud-model", dest="cloud_models", action="append", default=[], metavar="TARGET",
                        help="record a cloud target in the bundle (repeatable: the substitute first, then the "
                        "alternatives; default: the package's list)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write (or add a format to)")
    parser.add_argument("--zip", action="store_true",
                        help="also write OUT.zip beside the folder (one file to copy; 'smoledge run' opens it)")
    parser.add_argument("--no-progress", action="store_true",
                        help="print no progress (the libraries' own bars, coremltools' too, included)")


# old flag -> (the one format it sets, the flag that replaced it)
DEPRECATED_FLAGS = {"--max-context-len": ("executorch", "--context"), "--coreml-context": ("coreml", "--context")}


def _deprecated_dest(flag: str) -> str:
    return "deprecated_" + dest_of(flag)


def dest_of(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def target_options(args: argparse.Namespace, formats: tuple[str, ...]) -> dict:
    """Each format's target options from the flags; a deprecated alias (one line on stderr) overrides the
    new flag for its own format."""
    import sys

    values = vars(args)
    options = {}
    for fmt in formats:
        spec = FORMATS[fmt]
        flags = {dest(f): values[dest(f)] for f in spec.export_flags}
        given_as = {}
        for old, (old_fmt, new) in DEPRECATED_FLAGS.items():
            if values.get(_deprecated_dest(old)) is not None and old_fmt == fmt:
                flags[dest_of(new)], given_as[dest_of(new)] = values[_deprecated_dest(old)], old
        options[fmt] = spec.options_from_flags(flags, given_as)
    for old, (_fmt, new) in DEPRECATED_FLAGS.items():
        if values.get(_deprecated_dest(old)) is not None:
            print(f"smoledge export: {old} is deprecated; use {new} (one flag for every format)", file=sys.stderr)
    return options


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written, before minutes of export work (not after)."""
    import tempfile

    from smoledge.errors import ConfigError

    folder = Path(out).expanduser().absolute()
    existing = folder if folder.exists() else next(p for p in folder.parents if p.exists())
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, not a folder", hint="choose a folder path for --out")
    try:  # a real write: access() says yes to root on a read-only file system
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"--out {out} is not writable ({existing}: {err.strerror or err})",
                          hint="choose a writable --out folder") from None


def main(args: argparse.Namespace) -> int:
    from smoledge.export.entry import require_export_extra
    from smoledge.progress import Progress

    require_export_extra("export")
    check_out(args.out)
    with Progress("export", enabled=not args.no_progress) as progress:
        progress.step("loading torch and transformers")  # quiet_libraries imports them: seconds
        path = _export(args, progress)
        if args.zip:
            from smoledge.export.bundle_writer import write_zip

            progress.step("writing the zip")
            zipped = write_zip(path)
    print(path)  # the answer, on stdout, once the status line on stderr is gone
    if args.zip:
        print(zipped)
    return 0


def _export(args: argparse.Namespace, progress) -> Path:
    from smoledge.export.entry import quiet_libraries

    if not args.debug:
        quiet_libraries()
    from smoledge.cloud_fallback.config import parse_models
    from smoledge.export.pipeline import ExportJob, export_bundle
    from smoledge.quantize.recipe import load_recipe, with_vision_precision

    formats = tuple(dict.fromkeys(args.formats or ["onnx"]))
    recipe = with_vision_precision(load_recipe(args.quant), args.vision_precision)
    options = target_options(args, formats)
    cloud = parse_models(",".join(args.cloud_models)) if args.cloud_models else ()
    job = ExportJob(model=args.model, out=args.out, recipe=recipe, formats=formats, revision=args.revision,
                    target_options=options, adapter=args.adapter, adapter_revision=args.adapter_revision,
                    cloud_models=cloud)
    return export_bundle(job, progress=progress)
