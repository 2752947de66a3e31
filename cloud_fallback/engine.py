"""The local side the router talks to: any object with a manifest, ``measure`` and ``stream``.

The ONNX runtime's engine (``smoledge.runtime.load(bundle)``) satisfies this protocol; so does any
test double.  The router never imports a backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from smoledge.runtime.manifest import Manifest
from smoledge.runtime.types import ChatRequest, RequestShape, StreamChunk


@runtime_checkable
class LocalEngine(Protocol):
    @property
    def manifest(self) -> Manifest:
        """The bundle's typed manifest (the router reads ``context_length``, ``memory``, ``source``, ``image``,
        ``cloud``); ``context_length`` is the window this engine serves."""
        ...

    def measure(self, request: ChatRequest) -> RequestShape:
        """Tiles, frames and prompt tokens of ``request`` without running the model (may raise InputError)."""
        ...

    def stream(self, request: ChatRequest) -> Iterator[StreamChunk]:
        """Generate the answer chunk by chunk (may raise BackendError, MemoryError, ... at any point)."""
        ...
