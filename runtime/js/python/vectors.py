"""Shared test vectors for the TypeScript runtime, written by the Python runtime.

``python runtime/js/python/vectors.py OUT [--no-realtext]`` (bundles from the smoledge cache, keyed by what they
are exported from) or ``tests/test_js_runtime.py`` (the test session's bundles) writes into ``OUT``:

  images/*.png|jpg   the odd images (tiny, huge, panorama, tall, gray, RGBA, palette, EXIF-rotated, 16-bit, ...)
  images.json        per image: what load_image decoded (size, sha256 of the RGB bytes), each tile's uint8 sha256,
                     the grid, the pixel_values file (float32, little-endian) and the prompt ids
  *.f32 / *.u8       pixel values / decoded pixels
  generation.json    greedy ids for 32 steps on the tiny fp32 bundle: text, one image, two images
  generation_kv16.json  the same on the tiny fp32 bundle exported with an fp16 KV cache (kv_cache: float16)
  errors.json        class name, exit code and message of the Python runtime's error for each bad input
  resize.json        PIL LANCZOS resizes of random pictures to random sizes (both pass orders)
  bundles.json       the bundles used (tiny fp32, tiny fp32 with an fp16 KV cache, real-text int4)

Nothing here is committed; it is rebuilt from code.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from smoledge.runtime.cache import cache_path

REPO = Path(__file__).resolve().parents[3]
PARIS_QUESTION = "What is the capital of France? Answer in one sentence."
STEPS = 32


def export_key(model_dir: Path, recipe: str) -> str:
    """What a bundle is exported from: the model folder's config and weights, the recipe, the export and
    quantize sources, and the onnxruntime / onnx versions."""
    import onnx
    import onnxruntime

    digest = hashlib.sha256(f"{recipe}:{onnxruntime.__version__}:{onnx.__version__}".encode())
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
            if path.suffix in (".json", ".jinja", ".txt"):
                digest.update(path.read_bytes())
    for folder in ("export", "quantize"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".json"):
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cached_bundle(model_dir: Path, name: str, recipe: str, kv_cache: str | None = None) -> Path:
    """``recipe`` (with its kv_cache replaced when given), exported once per :func:`export_key`."""
    key = export_key(model_dir, recipe if kv_cache is None else f"{recipe}:kv_cache={kv_cache}")
    out = cache_path("js-bundles") / f"{name}-{key}"
    if (out / "manifest.json").is_file():
        return out
    from dataclasses import replace

    from smoledge.export.pipeline import ExportJob, export_bundle
    from smoledge.quantize.recipe import load_recipe

    loaded = load_recipe(recipe)
    loaded = replace(loaded, kv_cache=kv_cache) if kv_cache else loaded
    return export_bundle(ExportJob(model=str(model_dir), out=out, recipe=loaded, formats=("onnx",)),
                         show_progress=False)


# --------------------------------------------------------------------------------------------- images


def _gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) * 127 / max(width + height, 1)], -1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype("uint8")


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def odd_images(folder: Path) -> list[Path]:
    """Write the image set; each name says what is odd about it."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = lambda w, h, s=0: Image.fromarray(_gradient(w, h, s))  # noqa: E731
    images = {
        "tiny-3x2.png": rgb(3, 2),
        "one-pixel.png": rgb(1, 1, 1),
        "huge-4500x3000.png": rgb(4500, 3000, 2),
        "panorama-1600x200.png": rgb(1600, 200, 3),
        "tall-120x900.png": rgb(120, 900, 4),
        "gray-L.png": rgb(300, 200, 5).convert("L"),
        "rgba.png": Image.fromarray(np.dstack([_gradient(257, 129, 6), _gradient(257, 129, 7)[..., 0]])),
        "gray-alpha-LA.png": rgb(90, 70, 8).convert("LA"),
        "palette-P.png": rgb(200, 150, 9).convert("P", palette=Image.Palette.ADAPTIVE, colors=37),
        "one-bit.png": rgb(64, 48, 10).convert("1"),
    }
    paths = []
    for name, image in images.items():
        paths.append(folder / name)
        image.save(paths[-1])
    # 16-bit PNGs: gray ("I;16", values above 255 clip) and RGB (PIL keeps the high byte)
    g16 = (_gradient(150, 100, 11)[..., 0].astype(np.uint16) * 3).astype(np.uint16)
    paths.append(folder / "gray-16bit.png")
    Image.fromarray(g16).save(paths[-1])
    paths.append(folder / "rgb-16bit.png")
    _write_png16_rgb(paths[-1], _gradient(140, 90, 12).astype(np.uint16) * 257 + 3)
    for orientation in (3, 6, 8, 5):
        paths.append(folder / f"exif-{orientation}.png")
        rgb(160, 100, 20 + orientation).save(paths[-1], exif=_exif(orientation))
    paths.append(folder / "exif-6.jpg")
    rgb(320, 200, 30).save(paths[-1], quality=92, exif=_exif(6))
    paths.append(folder / "photo-420.jpg")
    rgb(500, 375, 31).save(paths[-1], quality=90)
    paths.append(folder / "photo-444.jpg")
    rgb(400, 300, 32).save(paths[-1], quality=95, subsampling=0)
    paths.append(folder / "gray.jpg")
    rgb(240, 180, 33).convert("L").save(paths[-1], quality=90)
    return paths


def _write_png16_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG (PIL cannot write one itself), written chunk by chunk."""
    import struct
    import zlib

    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_vectors(out: Path, pipe) -> list[dict]:
    from smoledge.runtime.preprocess import image_tiles, load_image, preprocess
    from smoledge.runtime.types import ChatRequest, Message

    cfg = pipe.image_config
    records = []
    for path in odd_images(out / "images"):
        decoded = load_image(path)
        raw = np.asarray(decoded).tobytes()
        (out / "decoded").mkdir(exist_ok=True)
        (out / "decoded" / f"{path.name}.u8").write_bytes(raw)
        tiles, grid = image_tiles(decoded, cfg)
        processed = preprocess([path], cfg)
        (out / "pixels").mkdir(exist_ok=True)
        (out / "pixels" / f"{path.name}.f32").write_bytes(processed.pixel_values.astype("<f4").tobytes())
        ids = pipe.prepare(ChatRequest((Message.user("Describe this image.", [path]),))).input_ids[0].tolist()
        records.append({"file": f"images/{path.name}", "width": decoded.width, "height": decoded.height,
                        "decoded": f"decoded/{path.name}.u8", "tiles_sha256": [_sha(np.ascontiguousarray(t).tobytes()) for t in tiles],
                        "grid": list(grid), "pixels": f"pixels/{path.name}.f32",
                        "shape": list(processed.pixel_values.shape), "prompt": "Describe this image.", "prompt_ids": ids})
    return records


# --------------------------------------------------------------------------------------------- generation


def resize_vectors(out: Path) -> list[dict]:
    """PIL's LANCZOS resize of random RGB pictures to random sizes (both pass orders, the tie at
    in_h - out_h == 2 * (in_w - out_w), up and down, one side unchanged): input bytes and output sha256."""
    rng = np.random.RandomState(7)
    shapes = [(100, 100, 90, 80), (100, 100, 90, 79), (100, 100, 80, 61), (120, 900, 28, 216), (900, 120, 216, 28),
              (60, 50, 100, 30), (60, 50, 30, 100), (88, 52, 140, 70), (50, 60, 50, 20), (50, 60, 20, 60), (1, 7, 3, 2)]
    shapes += [tuple(int(v) for v in rng.randint(1, 160, 4)) for _ in range(40)]
    (out / "resize").mkdir(exist_ok=True)
    records = []
    for i, (iw, ih, ow, oh) in enumerate(shapes):
        pixels = rng.randint(0, 256, (ih, iw, 3)).astype("uint8")
        (out / "resize" / f"{i}.u8").write_bytes(pixels.tobytes())
        resized = np.asarray(Image.fromarray(pixels).resize((ow, oh), Image.Resampling.LANCZOS))
        records.append({"input": f"resize/{i}.u8", "in": [iw, ih], "out": [ow, oh], "sha256": _sha(resized.tobytes())})
    return records


def generation_vectors(pipe, images: list[Path]) -> list[dict]:
    """Greedy ids for exactly STEPS new tokens (EOS ignored, so every case runs all 32 steps)."""
    from smoledge.runtime.types import ChatRequest, Message, SamplingConfig

    cases = [("text", "Tell me a story about a cat.", []), ("one-image", "What is in this image?", images[:1]),
             ("two-images", "Compare these two images.", images[:2])]
    out = []
    eos, pipe.eos_ids = pipe.eos_ids, ()
    for name, prompt, imgs in cases:
        request = ChatRequest((Message.user(prompt, imgs),), SamplingConfig(max_new_tokens=STEPS))
        prepared = pipe.prepare(request)
        ids = [chunk.token_id for chunk in pipe.stream(request)]
        out.append({"name": name, "prompt": prompt, "images": [f"images/{p.name}" for p in imgs],
                    "prompt_ids": prepared.input_ids[0].tolist(), "generated_ids": ids, "text": pipe.generate(request)})
    pipe.eos_ids = eos
    return out


# --------------------------------------------------------------------------------------------- errors


def _error(fn) -> dict:
    from smoledge.errors import SmolEdgeError

    try:
        fn()
    except SmolEdgeError as err:
        return {"class": type(err).__name__, "exit_code": err.exit_code, "message": str(err)}
    raise AssertionError(f"{fn} raised nothing")


def error_vectors(out: Path, tiny: Path) -> list[dict]:
    """Each bad input (files written under ``out/bad``) and the Python runtime's error for it."""
    from smoledge.runtime.bundle import open_bundle
    from smoledge.runtime.pipeline import Pipeline
    from smoledge.runtime.preprocess import preprocess
    from smoledge.runtime.types import ChatRequest, Message, SamplingConfig

    bad = out / "bad"
    bad.mkdir(exist_ok=True)
    good = (out / "images" / "tiny-3x2.png").read_bytes()
    (bad / "truncated.png").write_bytes(good[: len(good) // 2])
    (bad / "notes.png").write_text("these are my notes, not a picture\n")
    (bad / "garbage.jpg").write_bytes(bytes(range(256)) * 4)
    (bad / "empty.png").write_bytes(b"")
    cases = [{"case": "missing-image", "image": str(bad / "nope.png")}]
    cases += [{"case": f"image-{p}", "image": str(bad / p)} for p in ("notes.png", "garbage.jpg", "empty.png")]
    for c in cases:
        c["error"] = _error(lambda c=c: preprocess([c["image"]], Pipeline.load(tiny, verify=False).image_config))
    records = list(cases)

    def variant(name: str, edit) -> Path:
        target = bad / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(tiny, target)
        edit(target)
        return target

    def flip_byte(b: Path) -> None:
        p = b / "tokenizer.json"
        data = bytearray(p.read_bytes())
        data[10] ^= 0x01
        p.write_bytes(bytes(data))

    def truncate(b: Path) -> None:
        p = b / "tokenizer.json"
        p.write_bytes(p.read_bytes()[:-7])

    def newer(b: Path) -> None:
        m = json.loads((b / "manifest.json").read_text())
        m["schema_version"] = 99
        (b / "manifest.json").write_text(json.dumps(m))

    for name, edit in (("tampered", flip_byte), ("truncated", truncate), ("newer-schema", newer)):
        target = variant(f"bundle-{name}", edit)
        records.append({"case": f"bundle-{name}", "bundle": str(target),
                        "error": _error(lambda t=target: open_bundle(t, verify=True))})
    records.append({"case": "no-bundle", "bundle": str(bad / "no-such-bundle"),
                    "error": _error(lambda: open_bundle(bad / "no-such-bundle"))})
    pipe = Pipeline.load(tiny, verify=False)
    long_prompt = "word " * (pipe.context_length + 10)
    req = ChatRequest((Message.user(long_prompt),), SamplingConfig(max_new_tokens=16))
    records.append({"case": "prompt-too-long", "bundle": str(tiny), "prompt": long_prompt, "max_new_tokens": 16,
                    "error": _error(lambda: pipe.prepare(req))})
    return records


def cached_bundles(realtext: bool = True) -> tuple[Path, Path | None]:
    """The tiny fp32 and the real-text INT4 bundles from the smoledge cache (exported on a miss)."""
    from smoledge.export.demo_models import ensure_tiny_model

    tiny = cached_bundle(ensure_tiny_model(), "tiny-fp32", "fp32")
    if not realtext:
        return tiny, None
    from smoledge.export.realtext_model import ensure_realtext_model

    return tiny, cached_bundle(ensure_realtext_model(), "realtext-int4", "int4")


def write_vectors(out: Path, tiny: Path, realtext: Path | None, tiny_kv16: Path | None = None) -> dict:
    """Write every vector into ``out`` for the tiny fp32 bundle and (when given) the real-text INT4 bundle and
    the tiny fp32 bundle with an fp16 KV cache."""
    from smoledge.runtime.pipeline import Pipeline

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    bundles = {"tiny_fp32": str(tiny)}
    if realtext is not None:
        bundles["realtext_int4"] = str(realtext)
    pipe = Pipeline.load(tiny)
    images = image_vectors(out, pipe)
    gen_images = [out / "images" / "panorama-1600x200.png", out / "images" / "exif-6.png"]  # PNG: decoded alike
    (out / "images.json").write_text(json.dumps(images))
    (out / "resize.json").write_text(json.dumps(resize_vectors(out)))
    (out / "generation.json").write_text(json.dumps(generation_vectors(pipe, gen_images)))
    if tiny_kv16 is not None:
        bundles["tiny_fp32_kv16"] = str(tiny_kv16)
        kv16 = generation_vectors(Pipeline.load(tiny_kv16), gen_images)
        (out / "generation_kv16.json").write_text(json.dumps(kv16))
    (out / "errors.json").write_text(json.dumps(error_vectors(out, tiny)))
    (out / "bundles.json").write_text(json.dumps({**bundles, "paris_question": PARIS_QUESTION,
                                                  "house": str(REPO / "examples" / "house.png")}))
    return bundles


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="write the JS runtime's shared test vectors")
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-realtext", action="store_true", help="no real-text bundle (no Paris, browser tests)")
    parser.add_argument("--tiny", type=Path, help="a tiny fp32 bundle to use instead of the cached one")
    parser.add_argument("--realtext", type=Path, help="a real-text INT4 bundle to use instead of the cached one")
    args = parser.parse_args()
    tiny = args.tiny or cached_bundles(realtext=False)[0]
    realtext = None if args.no_realtext else args.realtext or cached_bundles()[1]
    from smoledge.export.demo_models import ensure_tiny_model

    tiny_kv16 = cached_bundle(ensure_tiny_model(), "tiny-fp32-kv16", "fp32", kv_cache="float16")
    print(json.dumps(write_vectors(args.out, tiny, realtext, tiny_kv16)))


if __name__ == "__main__":
    main()
