"""A loaded bundle that answers chat requests: the local engine the CLI, the server and the cloud
fallback drive.

``Pipeline.load(path)`` opens and verifies the bundle, loads the tokenizer and a backend; then
``measure`` says what a request costs without running the model, ``stream`` answers it chunk by chunk
and ``generate`` returns the text.  The prompt ``measure`` renders and tokenizes (its :class:`Plan`) is
handed on to ``stream`` of the same request, so routing and generation render it once.  Only numpy, pillow, tokenizers, jinja2 and the backend's runtime
are imported (and PyAV once a request holds a video).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smoledge.errors import BundleError, InputError, PromptTooLongError, VideoError
from smoledge.runtime.backends import load_backend
from smoledge.runtime.bundle import Bundle, open_bundle
from smoledge.runtime.generate import Sampler, generate_step, generate_text, stream_generate
from smoledge.runtime.manifest import Manifest
from smoledge.runtime.preprocess import ImageProcessorConfig, ProcessedImages, preprocess, tile_grid
from smoledge.runtime.prompt import ImageTokens, add_special_tokens_for, build_prompt, image_prompt_string
from smoledge.runtime.types import ChatRequest, GenerationStats, ImagePart, RequestShape, StreamChunk, VideoPart
from smoledge.runtime.video import ProcessedVideo, VideoConfig, VideoPlan, load_video, plan_video, video_prompt_string


@dataclass(frozen=True)
class Prepared:
    input_ids: np.ndarray  # [1, S] int64
    images: ProcessedImages | None


@dataclass(frozen=True)
class Plan:
    """What ``measure`` worked out for a request: its shape, and the prompt ids for the tile grids and video
    frames it measured (reused by ``prepare`` when the decoded media give the same grids and frames)."""

    shape: RequestShape
    input_ids: np.ndarray
    grids: tuple[tuple[int, int], ...]
    videos: tuple[VideoPlan, ...]


_PLANS_KEPT = 8  # measured requests whose plan waits for their stream (the others went to the cloud)


class Pipeline:
    def __init__(self, bundle: Bundle, backend):
        from tokenizers import Tokenizer

        self.bundle = bundle
        self.backend = backend
        m = bundle.manifest
        try:
            self.tokenizer = Tokenizer.from_file(str(bundle.file(m.tokenizer.file)))
        except Exception as err:  # tokenizers raises a bare Exception on a bad file
            raise BundleError(f"the bundle's tokenizer cannot be read ({err})", hint="re-export the bundle") from None
        self.image_config: ImageProcessorConfig = m.image
        tokens = m.tokens
        self.image_tokens = ImageTokens(tokens.image, tokens.fake_image, tokens.global_image)
        self.image_token_id = tokens.image_token_id
        self.eos_ids = m.generation.eos_token_ids
        # The tokens this engine can serve: the model's window, capped by the backend's artifact whose KV
        # cache was sized at export (ExecuTorch's static cache, Core ML's state).  The router reads it
        # from ``manifest``.
        fmt = getattr(backend, "name", None)
        self.context_length = m.artifacts[fmt].capacity(m.context_length) if fmt in m.artifacts else m.context_length
        self._manifest = dataclasses.replace(m, context_length=self.context_length)
        self.video_config: VideoConfig | None = m.video
        self.last_stats = GenerationStats()
        self._plans: dict[int, tuple[ChatRequest, Plan]] = {}  # id(request) -> (request, its plan)

    @classmethod
    def load(cls, path: str | Path, backend: str = "onnx", *, verify: bool = True, **backend_options) -> "Pipeline":
        bundle = open_bundle(path, verify=verify)
        return cls(bundle, load_backend(backend, bundle, **backend_options))

    @property
    def manifest(self) -> Manifest:
        """The bundle's manifest, with ``context_length`` the window this backend serves (see ``__init__``)."""
        return self._manifest

    def with_image_config(self, image_config: ImageProcessorConfig) -> "Pipeline":
        """This pipeline (the same backend, tokenizer and bundle) splitting images by ``image_config``: the
        router's tile budget answers a photo with fewer tiles this way (cloud_fallback/tile_budget.py)."""
        view = copy.copy(self)
        view.image_config = image_config
        return view

    def set_video_max_frames(self, max_frames: int | None) -> None:
        """Sample at most ``max_frames`` frames per video from now on (None keeps the bundle's setting)."""
        if max_frames is not None and self.video_config is not None:
            self.video_config = self.video_config.with_max_frames(max_frames)

    # ------------------------------------------------------------------ prompt
    def prompt_ids(self, request: ChatRequest, grids, videos: Sequence[VideoPlan] = ()) -> np.ndarray:
        """The tokenized prompt of ``request`` for these tile grids and video plans, [1, S] int64."""
        m = self.manifest
        template, video_prompts, video = m.chat_template, [], self.video_config
        if videos:  # SmolVLM2: a request with a video is rendered with the video chat template
            template = video.chat_template or template
            frame = image_prompt_string(0, 0, self.image_tokens, self.image_config.image_seq_len)
            video_prompts = [video_prompt_string(plan, video, frame) for plan in videos]
        prompt = build_prompt(request.messages, grids, template, self.image_tokens,
                              self.image_config.image_seq_len, bos_token=m.tokens.bos_token,
                              eos_token=m.tokens.eos_token, video_prompts=video_prompts,
                              video_token=video.video_token if video else "<video>")
        special = add_special_tokens_for(prompt, m.tokens.bos_token)
        ids = self.tokenizer.encode(prompt, add_special_tokens=special).ids
        return np.asarray([ids], dtype=np.int64)

    def _check_request(self, request: ChatRequest) -> None:
        if request.videos() and self.video_config is None:
            raise VideoError("this bundle has no video settings (it was exported before video support)",
                             hint="re-export the bundle with this smoledge version")
        if not any(m.content for m in request.messages):
            raise InputError("the request has no content", hint="give a prompt")

    def measure(self, request: ChatRequest) -> RequestShape:
        """What the request costs, from image sizes, video headers and the tokenised prompt; no pixels decoded.
        The plan is kept for ``stream`` / ``prepare`` of this same request object."""
        plan = self.plan(request)
        self._plans[id(request)] = (request, plan)
        while len(self._plans) > _PLANS_KEPT:
            self._plans.pop(next(iter(self._plans)), None)
        return plan.shape

    def plan(self, request: ChatRequest) -> Plan:
        from smoledge.runtime.preprocess import peek_image_size, tiles_in_grid

        self._check_request(request)
        grids = tuple(tile_grid(*peek_image_size(img), self.image_config) for img in request.images())
        plans = tuple(plan_video(video, self.video_config) for video in request.videos())
        ids = self.prompt_ids(request, grids, plans)
        shape = RequestShape(prompt_tokens=ids.shape[1], max_new_tokens=request.sampling.max_new_tokens,
                             image_tiles=sum(tiles_in_grid(r, c) for r, c in grids), images=len(grids),
                             video_frames=sum(plan.frames for plan in plans))
        return Plan(shape, ids, grids, plans)

    def _measured_ids(self, request: ChatRequest, grids, videos) -> np.ndarray | None:
        """The prompt ids ``measure`` made for this request, if the media it measured are what was decoded."""
        kept = self._plans.pop(id(request), None)
        if kept is None or kept[0] is not request:
            return None
        plan = kept[1]
        return plan.input_ids if plan.grids == tuple(grids) and plan.videos == tuple(videos) else None

    def prepare(self, request: ChatRequest) -> Prepared:
        self._check_request(request)
        images = None
        sources = request.images()
        if sources:
            # paths/bytes go through load_image inside preprocess; PIL images are taken as given (as HF does)
            images = preprocess(list(sources), self.image_config)
        videos = [load_video(video, self.video_config) for video in request.videos()]
        grids, video_plans = images.grids if images else (), [v.plan for v in videos]
        ids = self._measured_ids(request, grids, video_plans)
        if ids is None:
            ids = self.prompt_ids(request, grids, video_plans)
        total = ids.shape[1] + request.sampling.max_new_tokens
        if total > self.context_length:
            raise PromptTooLongError(
                f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({request.sampling.max_new_tokens}) = {total} "
                f"exceeds the model's context window of {self.context_length}",
                hint="shorten the prompt, use fewer/smaller images, fewer video frames (--max-frames) "
                "or lower --max-new-tokens")
        return Prepared(ids, vision_input(request, images, videos))

    # ------------------------------------------------------------------ generation
    def prompt_embeds(self, prepared: Prepared) -> np.ndarray:
        embeds = self.backend.embed(prepared.input_ids)
        if prepared.images is not None:
            features = self.backend.encode_images(prepared.images.pixel_values, prepared.images.pixel_attention_mask)
            features = features.reshape(-1, features.shape[-1])
            slots = np.flatnonzero(prepared.input_ids[0] == self.image_token_id)
            if len(slots) != len(features):
                raise InputError(f"the prompt has {len(slots)} image slots for {len(features)} image features",
                                 hint="the prompt must not contain the literal image token text")
            embeds = embeds.copy()
            embeds[0, slots] = features
        return embeds

    def stream(self, request: ChatRequest) -> Iterator[StreamChunk]:
        stats = self.last_stats = GenerationStats()
        start = time.perf_counter()
        prepared = self.prepare(request)
        stats.preprocess_s = time.perf_counter() - start
        stats.prompt_tokens = prepared.input_ids.shape[1]
        stats.image_tiles = 0 if prepared.images is None else len(prepared.images.pixel_values)
        t0 = time.perf_counter()
        embeds = self.prompt_embeds(prepared)
        stats.vision_s = time.perf_counter() - t0
        cfg = request.sampling
        cache = self.backend.new_cache(prepared.input_ids.shape[1] + cfg.max_new_tokens)
        steps = generate_step(self.backend, embeds, cache, Sampler(cfg), cfg.max_new_tokens)
        for chunk in stream_generate(steps, self.tokenizer, self.eos_ids, cfg.stop, cfg.max_new_tokens):
            stats.completion_tokens += 1
            if stats.completion_tokens == 1:
                stats.time_to_first_token_s = time.perf_counter() - start
            stats.total_s = time.perf_counter() - start
            yield chunk

    def generate(self, request: ChatRequest) -> str:
        return generate_text(self.stream(request))


def vision_input(request: ChatRequest, images: ProcessedImages | None,
                 videos: list[ProcessedVideo]) -> ProcessedImages | None:
    """Image tiles and video frames in the order their placeholders take in the prompt (message part
    order); a frame is an unsplit image, grid (0, 0)."""
    if not videos:
        return images
    tiles, grids, image_i, video_i, tile_i = [], [], 0, 0, 0
    for part in (p for m in request.messages for p in m.content):
        if isinstance(part, ImagePart):
            n = images.tiles_per_image[image_i]
            tiles.append((images.pixel_values[tile_i:tile_i + n], images.pixel_attention_mask[tile_i:tile_i + n]))
            grids.append(images.grids[image_i])
            image_i, tile_i = image_i + 1, tile_i + n
        elif isinstance(part, VideoPart):
            frames = videos[video_i].pixel_values
            tiles.append((frames, np.ones((len(frames), *frames.shape[2:]), dtype=bool)))
            grids.extend([(0, 0)] * len(frames))
            video_i += 1
    height = max(px.shape[2] for px, _ in tiles)
    width = max(px.shape[3] for px, _ in tiles)
    pad = [((0, 0), (0, 0), (0, height - px.shape[2]), (0, width - px.shape[3])) for px, _ in tiles]
    pixel_values = np.concatenate([np.pad(px, p) for (px, _), p in zip(tiles, pad)])
    mask = np.concatenate([np.pad(m, p[1:]) for (_, m), p in zip(tiles, pad)])
    return ProcessedImages(pixel_values, mask, tuple(grids))


def load(path: str | Path, backend: str = "onnx", **options) -> Pipeline:
    return Pipeline.load(path, backend, **options)
