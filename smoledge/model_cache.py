"""What ``smoledge run MODEL`` runs: a bundle as given, a checkpoint exported once into the smoledge cache, a Hub
repo's bundle pulled (:mod:`smoledge.hub`).

A checkpoint (a local folder, or a Hub repo holding a model) is exported into
``<cache>/exports/<name>-<recipe>-<format>-<key>``, where the key hashes what the bundle is built from: the
model (its path and its files' sizes and mtimes, or the Hub id and resolved commit), the recipe, the formats and
the smoledge version and manifest schema.  The export goes through the bundle writer's staging, so an
interrupted one leaves no half-written bundle; the next run with the same inputs reuses the bundle.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

from smoledge.errors import BundleError, ModelLoadError
from smoledge.quantize.recipe import DEFAULT_RECIPE

# an owner/name Hub id, as huggingface_hub validates them
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def is_bundle(path: Path) -> bool:
    import zipfile

    return (path / "manifest.json").is_file() or (path.is_file() and zipfile.is_zipfile(path))


def bundle_for(source: str, *, revision: str | None = None, quant: str | None = None,
               backend: str | None = None) -> Path:
    """The bundle to run for ``source`` (see the module doc); anything else is returned as given, for
    ``open_bundle`` to explain."""
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir() and not is_bundle(path) and (path / "config.json").is_file():
            return cached_export(str(path.resolve()), None, path, quant, backend)
        return path
    if REPO_ID.match(source):
        from smoledge import hub

        try:
            kind, snapshot = hub.probe(source, revision)
        except ModelLoadError as err:  # `run out/bundle` with a typo reads as a Hub id: say both
            raise BundleError(f"no bundle or model folder at {source}, and {err.message}", hint=err.hint) from None
        if kind == "bundle":
            return hub.pull(source, revision)
        return cached_export(source, snapshot.name, snapshot, quant, backend)
    return path


def export_formats(backend: str | None) -> tuple[str, ...]:
    """The format to export for this machine: ``--backend``, else the first registered backend that runs here."""
    from smoledge.runtime.formats import FORMATS, pick_backend

    return (backend,) if backend else (pick_backend(tuple(FORMATS), "smoledge"),)


def cache_key(model: str, revision: str | None, folder: Path, recipe: str, formats: tuple[str, ...]) -> str:
    """A hash of what the bundle is built from; a local folder's files by name, size and mtime (no hashing
    of gigabytes on every run)."""
    from smoledge import __version__
    from smoledge.runtime.manifest import SCHEMA_VERSION

    files = []
    if revision is None:
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith("."))
    recipe_path = Path(recipe)
    recipe_id = hashlib.sha256(recipe_path.read_bytes()).hexdigest() if recipe_path.is_file() else recipe
    inputs = {"model": model, "revision": revision, "files": files, "recipe": recipe_id, "formats": list(formats),
              "smoledge": __version__, "schema": SCHEMA_VERSION}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def export_path(model: str, revision: str | None, folder: Path, recipe: str, formats: tuple[str, ...]) -> Path:
    from smoledge.runtime.cache import cache_path

    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model).name or model).strip("-.") or "model"
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(recipe).stem)
    key = cache_key(model, revision, folder, recipe, formats)
    return cache_path("exports") / f"{name}-{label}-{'+'.join(formats)}-{key}"


def cached_export(model: str, revision: str | None, folder: Path, quant: str | None, backend: str | None) -> Path:
    """The cached bundle of this checkpoint, recipe and format; exported first when there is none."""
    recipe_name = quant or DEFAULT_RECIPE
    formats = export_formats(backend)
    out = export_path(model, revision, folder, recipe_name, formats)
    if (out / "manifest.json").is_file():
        return out
    from smoledge.export.entry import require_export_extra

    require_export_extra("run", subject="running a checkpoint (it is exported first)",  # before saying it exports
                         alternative="or run a bundle ('smoledge pull REPO_ID' fetches a pre-built one)")
    took = _fallbacks(recipe_name, formats)
    print(f"smoledge run: exporting {model} once ({recipe_name}, {', '.join(formats)}{took}) into {out}",
          file=sys.stderr, flush=True)
    _export(model, revision, out, recipe_name, formats)
    return out


def _fallbacks(recipe_name: str, formats: tuple[str, ...]) -> str:
    """``; executorch takes int4`` where the recipe names another recipe for a format."""
    from smoledge.quantize.recipe import load_recipe

    recipe = load_recipe(recipe_name)
    chosen = {fmt: recipe.for_format(fmt) for fmt in formats}
    return "".join(f"; {fmt} takes {r.name}" for fmt, r in chosen.items() if r is not recipe)


def _export(model: str, revision: str | None, out: Path, recipe_name: str, formats: tuple[str, ...]) -> None:
    from smoledge.export.entry import quiet_libraries

    quiet_libraries()
    from smoledge.export.pipeline import ExportJob, export_bundle
    from smoledge.quantize.recipe import load_recipe

    job = ExportJob(model=model, out=out, recipe=load_recipe(recipe_name), formats=formats, revision=revision)
    export_bundle(job, show_progress=sys.stderr.isatty())
