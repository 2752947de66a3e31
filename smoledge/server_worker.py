"""The serving core of ``smoledge serve``: one model, a bounded queue, one worker thread per request.

:class:`Service` owns the local engine (one model instance), the router config, one
:class:`CloudFallback` (so cooldowns outlive a request) and the local health across requests (a
:class:`HealthTracker`: after repeated local failures it sends requests away, then lets one try local
again after a cool-off).
``Service.admit(request, loop)`` returns a started :class:`Job`, or None when the server is full
(in flight = running + waiting >= capacity).  A job runs the local-first entry point ``answer(...)``
in its own thread and hands events to the event loop: ``("chunk", StreamChunk)`` ..., then one of
``("end", Usage)``, ``("error", exc)`` or ``("cancelled", None)``; ``job.route`` is where it runs, and
``job.tiles`` says when the tile budget answered a photo with fewer tiles.

Local generation takes turns on the model through :class:`ModelGate`, first come first served; a job
waiting for its turn, or generating, stops at the next token once ``Job.cancel()`` is called (client
gone, server shutting down) - the model's step in flight still finishes.  Cloud-routed jobs do not
wait for the model.  No web stack is imported here.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from smoledge.cloud_fallback import CloudFallback, HealthTracker, LocalHealth, RouterConfig, answer
from smoledge.runtime.server_protocol import Route, Usage
from smoledge.runtime.types import ChatRequest, RequestShape, StreamChunk

_POLL_S = 0.05


class ModelGate:
    """Turns on the one model instance, in arrival order; a waiter may give up its place."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._line: deque[object] = deque()
        self._busy = False

    @property
    def waiting(self) -> int:
        return len(self._line)

    def acquire(self, stop: threading.Event) -> bool:
        """Wait for the model; False (without the model) once ``stop`` is set."""
        me = object()
        with self._cond:
            self._line.append(me)
            try:
                while True:
                    if stop.is_set():  # checked first: a cancelled waiter never takes the model
                        return False
                    if not self._busy and self._line[0] is me:
                        break
                    self._cond.wait(_POLL_S)
                self._busy = True
                return True
            finally:
                self._line.remove(me)
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()


class Admission:
    """At most ``capacity`` requests in flight, and a Retry-After for the ones turned away."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_flight = 0
        self._mean_s = 1.0  # recent time in flight per request (waiting included)
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            if self.in_flight >= self.capacity:
                return False
            self.in_flight += 1
            return True

    def leave(self, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            self._mean_s = 0.8 * self._mean_s + 0.2 * seconds

    def retry_after_s(self) -> int:
        """When full, a place frees about every ``time in flight / capacity`` seconds (Little's law)."""
        with self._lock:
            return max(1, min(60, math.ceil(self._mean_s / max(1, self.capacity))))


class RequestEngine:
    """The ``LocalEngine`` one request sees: the shared model, taken in turn, stoppable per request.

    It passes on what routing reads from the model: its ``backend`` (so the router applies the calibration
    record and the measured memory of the backend really served, not ONNX's) and its ``image_config``;
    ``with_image_config`` is the same request's view with fewer tiles, for the tile budget (``--max-tiles``,
    cloud_fallback/tile_budget.py), sharing the model's turn and the request's stop."""

    def __init__(self, engine: Any, gate: ModelGate, stop: threading.Event | None = None):
        self._engine, self._gate = engine, gate
        self.stop = stop or threading.Event()
        self.shape: RequestShape | None = None
        self.stats: Any = None

    @property
    def manifest(self):
        return self._engine.manifest

    @property
    def backend(self) -> Any:
        """The model's backend, read for its name by routing (``engine_format``); generation goes through
        :meth:`stream`, in turn."""
        return getattr(self._engine, "backend", None)

    @property
    def image_config(self) -> Any:
        """The model's image settings where it can also split images another way (else None: no tile budget)."""
        return getattr(self._engine, "image_config", None) if hasattr(self._engine, "with_image_config") else None

    def with_image_config(self, image_config: Any) -> "RequestEngine":
        """This request on the model splitting images by ``image_config`` (fewer tiles)."""
        return RequestEngine(self._engine.with_image_config(image_config), self._gate, self.stop)

    def measure(self, request: ChatRequest) -> RequestShape:
        self.shape = self._engine.measure(request)
        return self.shape

    def stream(self, request: ChatRequest) -> Iterator[StreamChunk]:
        if not self._gate.acquire(self.stop):
            return
        inner = None
        try:
            inner = iter(self._engine.stream(request))
            for chunk in inner:
                if self.stop.is_set():
                    break
                yield chunk
        finally:
            close = getattr(inner, "close", None)
            if close is not None:
                close()
            self.stats = getattr(self._engine, "last_stats", None)  # read while the model is still ours
            self._gate.release()


class Service:
    def __init__(self, engine: Any, config: RouterConfig, *, queue_size: int = 8, model_id: str = "smoledge",
                 cloud: CloudFallback | None = None):
        self.engine, self.config, self.model_id = engine, config, model_id
        self.gate = ModelGate()
        self.admission = Admission(capacity=queue_size + 1)
        self.cloud = cloud or CloudFallback.from_config(config)
        self.jobs: set[Job] = set()
        self.draining = False
        self.tracker = HealthTracker(config.policy)
        self._lock = threading.Lock()

    @property
    def health(self) -> LocalHealth:
        return self.tracker.current

    def update_health(self, result: Any) -> None:
        self.tracker.record(result.local_tried, result.local_error, probe=result.health.probe)

    def admit(self, request: ChatRequest, loop: asyncio.AbstractEventLoop) -> Job | None:
        if self.draining or not self.admission.try_enter():
            return None
        job = Job(self, request, loop)
        with self._lock:
            self.jobs.add(job)
        job.start()
        return job

    def finished(self, job: Job, seconds: float) -> None:
        with self._lock:
            self.jobs.discard(job)
        self.admission.leave(seconds)

    def shutdown(self, timeout_s: float) -> int:
        """Cancel every job still running and wait up to ``timeout_s`` for their threads; returns how many."""
        self.draining = True
        with self._lock:
            jobs = list(self.jobs)
        for job in jobs:
            job.cancel()
        deadline = time.monotonic() + timeout_s
        for job in jobs:
            job.join(max(0.0, deadline - time.monotonic()))
        self.cloud.close()
        return len(jobs)

    def status(self) -> dict[str, Any]:
        health = self.health
        return {"status": "shutting_down" if self.draining else "ok", "model": self.model_id,
                "in_flight": self.admission.in_flight, "capacity": self.admission.capacity,
                "waiting_for_model": self.gate.waiting,
                "local": {"available": health.available, "consecutive_failures": health.consecutive_failures,
                          "deadline_misses": health.deadline_misses, "last_error": health.last_error or None}}


class Job:
    """One admitted request: ``answer(...)`` in a worker thread, its events on an asyncio queue."""

    def __init__(self, service: Service, request: ChatRequest, loop: asyncio.AbstractEventLoop):
        self.service, self.request, self.loop = service, request, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.route: Route | None = None
        self.tiles: tuple[int, int] | None = None  # (answered with, asked for) after a tile reduction
        self.engine = RequestEngine(service.engine, service.gate)
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="smoledge-request", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._cancelled.set()
        self.engine.stop.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _emit(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
            pass

    def _on_decision(self, decision: Any) -> None:
        """Called by ``answer`` in this thread; the last decision is in force before the first chunk."""
        self.route = Route(decision.route, decision.code, decision.reason)
        if decision.route != "local":
            self.engine.stop.set()  # a local run still waiting for the model is not needed any more
        elif not self.cancelled:
            self.engine.stop.clear()  # back to local (over the spend cap): the model is needed after all

    def _run(self) -> None:
        started, result, final = time.monotonic(), None, ("cancelled", None)
        health = self.service.tracker.begin()
        try:
            result = answer(self.request, self.engine, config=self.service.config, health=health,
                            cloud=self.service.cloud, on_decision=self._on_decision)
            if result.engine is not self.engine and result.shape is not None and self.engine.shape is not None:
                self.tiles = (result.shape.image_tiles, self.engine.shape.image_tiles)  # fewer tiles, of how many
            final = self._consume(result, result.engine)
        except BaseException as err:  # every failure goes to the client as an HTTP error
            final = ("error", err)
        finally:
            self.cancel()
            if result is not None:
                result.close()
                self.service.update_health(result)
            elif health.probe:
                self.service.tracker.record(False, None, probe=True)  # refused before it ran: free the probe
            self.service.finished(self, time.monotonic() - started)  # before the last event: a client that
            self._emit(*final)  # sends its next request at once finds the place free

    def _consume(self, result: Any, engine: Any) -> tuple[str, Any]:
        """``engine``: the one the router answers with (a view with fewer tiles after a tile reduction)."""
        pieces = 0
        for piece in result:
            if self.cancelled:
                return "cancelled", None
            pieces += 1
            self._emit("chunk", piece)
        if self.cancelled:
            return "cancelled", None
        return "end", self._usage(pieces, engine)

    def _usage(self, pieces: int, engine: Any) -> Usage:
        stats = getattr(engine, "stats", None)
        if self.route is not None and self.route.route == "local" and stats is not None:
            return Usage(stats.prompt_tokens, stats.completion_tokens)
        shape = self.engine.shape  # the request as sent to the cloud: all its tiles
        return Usage(shape.prompt_tokens if shape is not None else 0, pieces, estimated=True)
