"""The torch-free runtime: open a bundle, answer chat requests.

    >>> from smoledge.runtime import load, ChatRequest, Message
    >>> pipe = load("bundle/")
    >>> pipe.generate(ChatRequest((Message.user("What is in this image?", ["cat.jpg"]),)))
"""

from smoledge.runtime.pipeline import Pipeline, load
from smoledge.runtime.types import ChatRequest, ImagePart, Message, SamplingConfig, StreamChunk, TextPart, VideoPart

__all__ = ["ChatRequest", "ImagePart", "Message", "Pipeline", "SamplingConfig", "StreamChunk", "TextPart", "VideoPart", "load"]
