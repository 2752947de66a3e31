"""Pure request building: SmolVLM turns -> OpenAI messages, data URLs, headers, targets and prices."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from test_cloud_fakes import MANIFEST, MODELS_LISTING, TOKEN

from smoledge.cloud_fallback import CloudConfig, cloud_targets
from smoledge.cloud_fallback.config import DEFAULT_MODELS
from smoledge.cloud_fallback.pricing import PriceBook
from smoledge.runtime.manifest import Cloud
from smoledge.cloud_fallback.request_builder import (
    build_chat_call,
    chat_payload,
    image_data_url,
    provider_of,
    split_target,
    to_openai_messages,
)
from smoledge.errors import ImageError, VideoError
from smoledge.runtime.types import ChatRequest, Message, SamplingConfig, TextPart, VideoPart


def _png_bytes(mode="RGBA") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (4, 3), 0).save(buf, format="PNG")
    return buf.getvalue()


def _decode(url: str) -> tuple[str, bytes]:
    head, data = url.split(",", 1)
    return head, base64.b64decode(data)


def test_user_turn_keeps_part_order_and_sends_images_as_data_urls(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(_png_bytes())
    request = ChatRequest((
        Message("system", (TextPart("Be brief."),)),
        Message.user("What is this?", [path]),
        Message("assistant", (TextPart("A "), TextPart("square."))),
    ))
    messages = to_openai_messages(request.messages)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[2] == {"role": "assistant", "content": "A square."}
    image, text = messages[1]["content"]
    assert text == {"type": "text", "text": "What is this?"}
    head, data = _decode(image["image_url"]["url"])
    assert image["type"] == "image_url" and head == "data:image/png;base64" and data == path.read_bytes()


def test_pil_images_are_encoded_and_unknown_bytes_re_encoded():
    head, data = _decode(image_data_url(Image.new("RGB", (8, 8), (255, 0, 0))))
    assert head == "data:image/jpeg;base64" and data.startswith(b"\xff\xd8\xff")
    tiff = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiff, format="TIFF")
    head, data = _decode(image_data_url(tiff.getvalue()))
    assert head == "data:image/jpeg;base64"


def test_unreadable_images_are_image_errors(tmp_path):
    with pytest.raises(ImageError, match="cannot read image"):
        image_data_url(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="not a readable image"):
        image_data_url(b"definitely not an image")
    with pytest.raises(ImageError, match="user turns only"):
        to_openai_messages((Message("assistant", (VideoPart(b"x"),)),))


def test_videos_are_sent_as_video_url_parts(tmp_path):
    av = pytest.importorskip("av")
    clip = tmp_path / "clip.webm"  # a real one: a video is measured (PyAV) before it is sent
    with av.open(str(clip), mode="w") as container:
        stream = container.add_stream("libvpx", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for _ in range(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((24, 32, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
    part = to_openai_messages((Message("user", (VideoPart(clip), TextPart("summarise"))),))[0]["content"][0]
    assert part["type"] == "video_url" and part["video_url"]["url"].startswith("data:video/webm;base64,")
    assert base64.b64decode(part["video_url"]["url"].split(",", 1)[1]) == clip.read_bytes()
    broken = tmp_path / "broken.webm"
    broken.write_bytes(b"\x1a\x45\xdf\xa3")
    with pytest.raises(VideoError, match=f"{broken} is not a readable video"):  # as an unreadable image: not sent
        to_openai_messages((Message("user", (VideoPart(broken),)),))


def test_payload_maps_sampling_and_asks_for_usage_in_the_stream():
    request = ChatRequest((Message.user("hi"),), SamplingConfig(max_new_tokens=12, temperature=0.0, top_p=0.9,
                                                                 seed=7, stop=("\n\n",)))
    payload = chat_payload(request, "acme/vlm:together")
    assert payload["model"] == "acme/vlm:together" and payload["max_tokens"] == 12
    assert payload["temperature"] == 0.0 and payload["top_p"] == 0.9 and payload["seed"] == 7
    assert payload["stop"] == ["\n\n"] and payload["stream"] is True
    assert payload["stream_options"] == {"include_usage": True}
    assert "top_p" not in chat_payload(ChatRequest((Message.user("hi"),)), "a/b")


def test_built_call_carries_token_and_bill_to_but_never_shows_the_token():
    call = build_chat_call(ChatRequest((Message.user("hi"),)), "a/b", base_url="http://x/v1/", token=TOKEN,
                           bill_to="acme-org")
    assert call.url == "http://x/v1/chat/completions" and call.method == "POST"
    assert call.headers["Authorization"] == f"Bearer {TOKEN}" and call.headers["X-HF-Bill-To"] == "acme-org"
    assert TOKEN not in repr(call)
    assert TOKEN not in repr(CloudConfig(token=TOKEN))


def test_targets_and_their_routing_suffixes():
    assert split_target("Qwen/Qwen2.5-VL-7B-Instruct:fastest") == ("Qwen/Qwen2.5-VL-7B-Instruct", "fastest")
    assert split_target("a/b") == ("a/b", None)
    assert provider_of("a/b:cheapest") is None and provider_of("a/b:nebius") == "nebius" and provider_of("a/b") is None


def test_target_order_config_then_manifest_then_defaults():
    assert cloud_targets(CloudConfig(models=("x/y",)), MANIFEST) == ("x/y",)
    assert cloud_targets(CloudConfig(), MANIFEST) == ("acme/vlm-large:fastest", "acme/vlm-small:fake-provider")
    assert cloud_targets(CloudConfig(), replace(MANIFEST, cloud=Cloud(None, ()))) == DEFAULT_MODELS
    assert cloud_targets(CloudConfig(), None) == DEFAULT_MODELS


def test_price_book_from_the_models_listing():
    book = PriceBook.from_listing(MODELS_LISTING["data"])
    assert book.estimate("acme/vlm-large:fastest", "fake-provider", 1_000_000, 2_000_000) == pytest.approx(3.5)
    assert book.estimate("acme/vlm-large", None, 10, 10) is None  # provider unknown: no guess
    assert book.estimate("acme/vlm-large", "other", 10, 10) is None
    assert book.estimate("acme/vlm-large", "fake-provider", None, 10) is None
    assert PriceBook.from_listing([{"id": "a", "providers": [{"provider": "p", "pricing": "n/a"}]}]).prices == {}
