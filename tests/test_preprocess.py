"""Parity of runtime/preprocess.py with transformers' SmolVLM / Idefics3 image processor.

The reference is the PIL variant, ``Idefics3ImageProcessorPil`` (SmolVLM's ``SmolVLMImageProcessorPil`` is
generated from the same code): the torchvision-based processor is not usable beside torch 2.13, and the PIL
one is what a torch-free runtime can match bit for bit.  Both resize with Pillow on uint8 pixels and do the
same float arithmetic, so pixel values must be *identical* (measured max-abs diff: 0.0 on every case here).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smoledge.errors import ConfigError, ImageError
from smoledge.runtime.preprocess import (
    ImageProcessorConfig,
    count_tiles,
    load_image,
    peek_image_size,
    preprocess,
    resized_size,
    tile_grid,
)

transformers = pytest.importorskip("transformers")
from transformers import Idefics3ImageProcessorPil  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402
from transformers.models.idefics3 import image_processing_pil_idefics3 as hf_idefics3  # noqa: E402

# (tile_size, longest_edge, image_seq_len)
SMOLVLM2_256M = ImageProcessorConfig(tile_size=512, longest_edge=2048, image_seq_len=64)  # also 500M
SMOLVLM2_2B = ImageProcessorConfig(tile_size=384, longest_edge=1536, image_seq_len=81)
TINY = ImageProcessorConfig(tile_size=54, longest_edge=216, image_seq_len=4)  # tiny test model: 54 px, patch 8

# The real SmolVLM2-256M-Video-Instruct preprocessor_config.json (image part).
SMOLVLM2_PREPROCESSOR_CONFIG = {
    "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "SmolVLMImageProcessor", "max_image_size": {"longest_edge": 512},
    "processor_class": "SmolVLMProcessor", "resample": 1, "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 2048},
    "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}},
}


# --------------------------------------------------------------------------------------------- helpers


def with_(cfg: ImageProcessorConfig, **changes) -> ImageProcessorConfig:
    return ImageProcessorConfig.from_dict({**cfg.to_dict(), **changes})


@cache
def hf_processor(cfg: ImageProcessorConfig) -> Idefics3ImageProcessorPil:
    return Idefics3ImageProcessorPil(
        size={"longest_edge": cfg.longest_edge}, max_image_size={"longest_edge": cfg.tile_size},
        do_resize=cfg.do_resize, do_image_splitting=cfg.do_image_splitting, resample=cfg.resample,
        do_rescale=cfg.do_rescale, rescale_factor=cfg.rescale_factor, do_normalize=cfg.do_normalize,
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std), do_convert_rgb=cfg.do_convert_rgb,
        do_pad=cfg.do_pad,
    )


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth gradient plus noise (exercises the resampling filter better than pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width, 1), yy * 255 // max(height, 1), (xx + yy) % 256], axis=-1)
    noise = rng.integers(0, 48, (height, width, 3))
    rgb = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        alpha.paste(0, (0, 0, max(width // 2, 1), height))  # left half fully transparent
        rgb.putalpha(alpha)
        return rgb
    if mode == "P":
        return rgb.quantize(colors=64)
    if mode in ("LA", "PA"):
        return make_image(width, height, "RGBA", seed).convert(mode)
    return rgb.convert(mode)


def assert_parity(ours_input: list, hf_input: list, cfg: ImageProcessorConfig) -> float:
    """Run both processors on one request; return the measured max-abs pixel difference (asserted 0)."""
    hf = hf_processor(cfg)(hf_input, return_row_col_info=True)
    ours = preprocess(ours_input, cfg)
    n = ours.pixel_values.shape[0]
    hf_pixels, hf_mask = hf["pixel_values"][0], hf["pixel_attention_mask"][0].astype(bool)
    assert hf_pixels.shape[0] == n, "HF pads a single-sample batch with no extra images"
    assert ours.pixel_values.dtype == np.float32 and ours.pixel_attention_mask.dtype == np.bool_
    assert ours.pixel_values.shape == hf_pixels.shape
    np.testing.assert_array_equal(ours.pixel_attention_mask, hf_mask)
    assert list(ours.grids) == list(zip(hf["rows"][0], hf["cols"][0]))
    diff = float(np.abs(ours.pixel_values - hf_pixels).max())
    assert diff == 0.0, f"max abs diff {diff}"
    assert sum(ours.tiles_per_image) == n
    return diff


# --------------------------------------------------------------------------------------------- sizes


REAL_SIZES = [(1, 1), (5, 7), "tile", (3000, 2000), (2000, 100), (100, 1500)]
TINY_SIZES = [(1, 1), (5, 7), (54, 54), (53, 55), (216, 216), (217, 100), (640, 480), (2000, 100),
              (100, 1500), (3000, 2000), (60, 50), (999, 1)]


@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
@pytest.mark.parametrize("cfg", [SMOLVLM2_256M, SMOLVLM2_2B], ids=["512-2048", "384-1536"])
@pytest.mark.parametrize("size", REAL_SIZES, ids=str)
def test_parity_real_configs(cfg, split, size):
    w, h = (cfg.tile_size, cfg.tile_size) if size == "tile" else size
    cfg = with_(cfg, do_image_splitting=split)
    image = make_image(w, h)
    assert_parity([image], [image], cfg)


@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
@pytest.mark.parametrize("size", TINY_SIZES, ids=str)
def test_parity_tiny_config(split, size):
    cfg = with_(TINY, do_image_splitting=split)
    image = make_image(*size, seed=size[0])
    assert_parity([image], [image], cfg)


@pytest.mark.parametrize("size", [(60, 50), (100, 30), (30, 100), (20, 20), (54, 54), (55, 54), (109, 300)], ids=str)
def test_parity_without_resize(size):
    """do_resize off: the image goes straight to the vision-encoder resize (multiples of the tile)."""
    cfg = with_(TINY, do_resize=False)
    image = make_image(*size)
    assert_parity([image], [image], cfg)
    assert preprocess([image], cfg).grids[0] == tile_grid(*size, cfg)


def test_parity_several_images_in_one_request():
    images = [make_image(640, 480, seed=1), make_image(5, 7, seed=2), make_image(2000, 100, seed=3),
              make_image(54, 54, seed=4)]
    assert_parity(images, images, TINY)
    assert_parity(images[:2], images[:2], with_(SMOLVLM2_2B, do_image_splitting=False))


def test_rescale_and_normalize_options():
    image = make_image(300, 200)
    for changes in ({"do_normalize": False}, {"do_rescale": False}, {"image_mean": [0.48, 0.45, 0.4],
                    "image_std": [0.26, 0.26, 0.27]}, {"resample": 3}, {"resample": 2}):
        assert_parity([image], [image], with_(TINY, **changes))


# --------------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mode", ["L", "LA", "PA", "RGBA", "P", "1", "CMYK", "I;16", "I", "F"])
def test_parity_pil_modes(mode):
    """PIL images go through HF's convert_to_rgb: anything with alpha is composited onto white."""
    if mode in ("I;16", "I", "F"):
        a = (np.arange(37 * 41).reshape(41, 37) * 97 % 65536).astype(np.uint16)
        image = Image.fromarray(a).convert(mode) if mode != "I;16" else Image.fromarray(a)
        assert image.mode == mode
    else:
        image = make_image(37, 41, mode)
    assert_parity([image], [image], TINY)


def test_parity_palette_with_transparency_and_real_config():
    """A palette transparency key survives convert("RGB") in PIL, so HF still composites that colour onto white."""
    image = make_image(300, 200, "P")
    image.info["transparency"] = 3  # palette index 3 is transparent
    assert_parity([image], [image], TINY)
    rgba = make_image(700, 500, "RGBA")
    assert_parity([rgba], [rgba], SMOLVLM2_256M)


def _save(image: Image.Image, path: Path, fmt: str, **kwargs) -> Path:
    image.save(path, format=fmt, **kwargs)
    return path


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    files = {}
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        files[f"exif{orientation}"] = _save(make_image(90, 40), d / f"exif{orientation}.jpg", "JPEG", exif=exif)
    files["cmyk"] = _save(make_image(70, 50, "CMYK"), d / "cmyk.jpg", "JPEG")
    files["rgba"] = _save(make_image(70, 50, "RGBA"), d / "rgba.png", "PNG")
    pal = make_image(60, 80, "P")
    files["palette"] = _save(pal, d / "palette.png", "PNG", transparency=5)
    files["gray16"] = _save(Image.fromarray((np.arange(3000).reshape(50, 60) * 20).astype(np.uint16)),
                            d / "gray16.png", "PNG")
    files["webp"] = _save(make_image(80, 60), d / "img.webp", "WEBP")
    return files


@pytest.mark.parametrize("name", ["exif3", "exif6", "exif8", "cmyk", "rgba", "palette", "gray16", "webp"])
def test_parity_files(image_files, name):
    """Paths go through HF's load_image: EXIF transpose, then a plain convert("RGB") (alpha dropped)."""
    path = image_files[name]
    ours = load_image(path)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(hf_load_image(str(path))))
    assert peek_image_size(path) == ours.size
    assert_parity([path], [str(path)], TINY)
    assert_parity([path.read_bytes()], [str(path)], TINY)
    assert_parity([ours], [str(path)], TINY)


def test_exif_rotation_swaps_size(image_files):
    path = image_files["exif6"]
    assert load_image(path).size == (40, 90)
    assert load_image(image_files["exif3"]).size == (90, 40)
    assert peek_image_size(path) == peek_image_size(path.read_bytes()) == (40, 90)
    assert tile_grid(*peek_image_size(path), TINY) == preprocess([path], TINY).grids[0] == (4, 2)


def test_decoded_pil_image_is_taken_as_given(image_files):
    """Like processor(images=[pil]): no EXIF rotation for an already decoded image, and peek agrees."""
    with Image.open(image_files["exif6"]) as pil:
        pil.load()
    assert peek_image_size(pil) == pil.size == (90, 40)
    assert tile_grid(*peek_image_size(pil), TINY) == preprocess([pil], TINY).grids[0] == (2, 4)
    assert_parity([pil], [pil], TINY)


def test_data_url(image_files):
    import base64

    url = "data:image/png;base64," + base64.b64encode(image_files["rgba"].read_bytes()).decode()
    np.testing.assert_array_equal(np.asarray(load_image(url)), np.asarray(load_image(image_files["rgba"])))


# --------------------------------------------------------------------------------------------- tile_grid


def _hf_rows_cols(width: int, height: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    out = hf_processor(cfg)(Image.new("RGB", (width, height)), return_row_col_info=True)
    return out["rows"][0][0], out["cols"][0][0]


@pytest.mark.parametrize("cfg", [TINY, with_(TINY, do_image_splitting=False), with_(TINY, do_resize=False),
                                 with_(TINY, longest_edge=200)], ids=["tiny", "nosplit", "noresize", "le200"])
def test_tile_grid_matches_full_preprocessing(cfg):
    sizes = [(w, h) for w in (1, 2, 27, 54, 55, 107, 108, 109, 161, 215, 216, 217, 400)
             for h in (1, 3, 54, 60, 163, 216, 230)]
    for w, h in sizes:
        grid = tile_grid(w, h, cfg)
        assert grid == _hf_rows_cols(w, h, cfg), (w, h)
        assert count_tiles(w, h, cfg) == (grid[0] * grid[1] + 1 if grid != (0, 0) else 1)


@pytest.mark.parametrize("cfg", [SMOLVLM2_256M, SMOLVLM2_2B], ids=["512", "384"])
def test_tile_grid_real_configs(cfg):
    for w, h in [(1, 1), (5, 7), (512, 512), (3000, 2000), (2000, 100), (100, 1500), (1920, 1080), (4032, 3024)]:
        expected = hf_processor(cfg).get_number_of_image_patches(h, w)[1:]  # HF's own cheap count
        assert tile_grid(w, h, cfg) == expected, (w, h)
    assert tile_grid(3000, 2000, SMOLVLM2_256M) == (3, 4)
    assert count_tiles(3000, 2000, SMOLVLM2_256M) == 13


def test_resized_size_matches_hf_including_4k_cap():
    for longest in (216, 1536, 2048, 5000, 9000):
        for w, h in [(1, 1), (3, 7), (7, 3), (1000, 999), (999, 1000), (12000, 13), (13, 12000), (4097, 4096)]:
            fake = np.broadcast_to(np.uint8(0), (3, h, w))  # only the shape is read
            assert resized_size(h, w, longest) == hf_idefics3.get_resize_output_image_size(fake, longest), (w, h)


# --------------------------------------------------------------------------------------------- config


def test_config_round_trip_is_json_safe():
    for cfg in (SMOLVLM2_256M, SMOLVLM2_2B, TINY):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert ImageProcessorConfig.from_dict(d) == cfg


def test_config_from_hf_preprocessor_config():
    cfg = ImageProcessorConfig.from_hf_preprocessor_config(SMOLVLM2_PREPROCESSOR_CONFIG, image_seq_len=64)
    assert cfg == SMOLVLM2_256M
    hf = Idefics3ImageProcessorPil(**{k: v for k, v in SMOLVLM2_PREPROCESSOR_CONFIG.items()
                                      if k not in ("image_processor_type", "processor_class", "video_sampling")})
    image = make_image(700, 300)
    np.testing.assert_array_equal(preprocess([image], cfg).pixel_values,
                                  hf(image)["pixel_values"][0])


@pytest.mark.parametrize("bad", [{"tile_size": 0}, {"longest_edge": -1}, {"image_seq_len": 1.5},
                                 {"image_mean": [0.5]}, {"image_std": [0.5, 0.0, 0.5]}, {"resample": 42},
                                 {"surprise": 1}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        ImageProcessorConfig.from_dict({**TINY.to_dict(), **bad})


def test_config_rejects_unsupported_hf_size():
    with pytest.raises(ConfigError, match="longest_edge"):
        ImageProcessorConfig.from_hf_preprocessor_config({"size": {"height": 384, "width": 384}}, 81)


# --------------------------------------------------------------------------------------------- errors


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    make_image(200, 150).save(buf, format="JPEG")
    return buf.getvalue()


def _error(src) -> str:
    with pytest.raises(ImageError) as info:
        load_image(src)
    message = str(info.value)
    assert "\n" not in message and "(" in message  # one line, with a hint
    return message


def test_error_missing_file(tmp_path):
    assert "not found" in _error(tmp_path / "nope.jpg")
    assert "not found" in _error(str(tmp_path / "nope.jpg"))
    assert "directory" in _error(tmp_path)


def test_error_corrupt_bytes():
    assert "not a readable image" in _error(b"\x00\x01\x02garbage\xff\xfe" * 10)
    assert "empty" in _error(b"")


def test_error_truncated_jpeg(tmp_path):
    data = _jpeg_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(path)
    assert "truncated" in _error(data[:300])


def test_error_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    message = _error(path)
    assert "text file" in message and str(path) in message


def test_error_unsupported_formats(tmp_path):
    assert "HEIC" in _error(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    assert "SVG" in _error(b'<svg xmlns="http://www.w3.org/2000/svg"></svg>')
    assert "not downloaded" in _error("https://example.com/cat.jpg")
    with pytest.raises(ImageError):
        load_image(12345)


def test_preprocess_surfaces_image_errors(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        preprocess([tmp_path / "missing.png"], TINY)
    with pytest.raises(ImageError, match="no images"):
        preprocess([], TINY)


def test_runtime_modules_import_no_torch_or_transformers():
    code = ("import sys, smoledge.runtime.preprocess, smoledge.runtime.prompt; "
            "print(sorted(m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
