"""Measure a device's speed figures with a short run of a real engine, and say what a bundle can do.

``calibrate(engine)`` times one text-only request (prompt tokens per second up to the first token,
new tokens per second after it) and one request with a single tile-sized image (the extra time to the
first token, per vision tile).  ``capabilities(manifest, profile)`` is pure: what fits this device, by the router's own estimate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, UTC

from smoledge.errors import BackendError
from smoledge.runtime.manifest import Manifest
from smoledge.runtime.preprocess import ImageProcessorConfig
from smoledge.runtime.types import ChatRequest, Message, RequestShape, SamplingConfig

from .engine import LocalEngine
from .policy import estimate
from .profiles import DeviceProfile, SpeedFigures

_TEXT_PROMPT = "Describe a quiet harbour at dawn in two sentences."
_IMAGE_PROMPT = "What is in this image?"


@dataclass(frozen=True)
class Timing:
    prompt_tokens: int
    tiles: int
    first_token_s: float
    new_tokens: int
    decode_s: float


def time_request(engine: LocalEngine, request: ChatRequest) -> Timing:
    shape = engine.measure(request)
    start = time.perf_counter()
    first = None
    tokens = 0
    for _chunk in engine.stream(request):
        now = time.perf_counter()
        if first is None:
            first = now
        tokens += 1
    end = time.perf_counter()
    if first is None:
        raise BackendError("the engine produced no token during calibration",
                           hint="check the bundle with `smoledge bundle verify`")
    return Timing(shape.prompt_tokens, shape.image_tiles, first - start, tokens, end - first)


def calibrate(engine: LocalEngine, *, new_tokens: int = 24) -> SpeedFigures:
    text = ChatRequest((Message.user(_TEXT_PROMPT),), SamplingConfig(max_new_tokens=new_tokens))
    time_request(engine, ChatRequest(text.messages, SamplingConfig(max_new_tokens=2)))  # warm-up
    t = time_request(engine, text)
    prefill = t.prompt_tokens / max(t.first_token_s, 1e-6)
    decode = (t.new_tokens - 1) / t.decode_s if t.new_tokens > 1 and t.decode_s > 0 else 0.0
    tile = engine.manifest.image.tile_size
    image_request = ChatRequest((Message.user(_IMAGE_PROMPT, [_test_image(tile)]),), SamplingConfig(max_new_tokens=1))
    i = time_request(engine, image_request)
    encode = max(0.0, i.first_token_s - i.prompt_tokens / prefill) / max(1, i.tiles)
    stamp = datetime.now(UTC).date().isoformat()
    return SpeedFigures(tile_encode_s=round(encode, 4), prefill_tok_s=round(prefill, 2),
                        decode_tok_s=round(decode, 2), source=f"calibrated {stamp}")


def _test_image(size: int):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@dataclass(frozen=True)
class Capabilities:
    weights_fit: bool
    max_tiles: int
    max_tokens: int
    typical_tiles: int
    typical_first_token_s: float
    typical_total_s: float
    typical_peak_bytes: int
    typical_fits: bool = True  # the typical photo's estimated peak is within the budget
    memory_source: str = "formula"  # calibrated | measured at export | formula


def capabilities(manifest: Manifest, profile: DeviceProfile, *, typical_new_tokens: int = 256,
                 backend: str | None = None) -> Capabilities:
    """What ``profile`` can run of this bundle: tiles and tokens that fit, and a typical one-image request."""
    image = manifest.image
    tiles = _tiles_per_image(image)
    prompt = tiles * image.image_seq_len + 32
    budget = profile.memory_budget_bytes

    def peak(prompt_tokens: int, new: int, n_tiles: int) -> int:
        shape = RequestShape(prompt_tokens, new, image_tiles=n_tiles, images=1 if n_tiles else 0)
        return estimate(shape, manifest, profile, backend).peak_memory_bytes

    est = estimate(RequestShape(prompt, typical_new_tokens, image_tiles=tiles, images=1), manifest, profile, backend)
    max_tiles = _largest(profile.max_image_tiles,
                         lambda n: peak(n * image.image_seq_len + 32, typical_new_tokens, n) <= budget)
    limit = min(manifest.context_length, profile.max_context)
    max_tokens = _largest(limit, lambda n: peak(n, 0, 0) <= budget)
    return Capabilities(peak(32, 1, 0) <= budget, max_tiles, max_tokens, tiles, est.first_token_s, est.total_s,
                        est.peak_memory_bytes, est.peak_memory_bytes <= budget, est.memory_source)


def _largest(upper: int, fits) -> int:
    """The largest n in [0, upper] with fits(n), for a ``fits`` that holds up to some n and not after."""
    if upper <= 0 or not fits(0):
        return 0
    low, high = 0, upper
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _tiles_per_image(image: ImageProcessorConfig) -> int:
    """Tiles of a typical large photo: the split grid at ``longest_edge`` plus the global image."""
    if not image.do_image_splitting:
        return 1
    per_side = -(-image.longest_edge // image.tile_size)
    return per_side * per_side + 1
