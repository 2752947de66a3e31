"""Device profiles: what a device can hold and how fast it runs, as data.

A profile is a JSON file in ``profiles/`` (one per device) read into a frozen :class:`DeviceProfile`.  Its
``backend_options`` (per bundle format, e.g. ``{"onnx": {"vision_session": "release"}}``) are the runtime options
the CLI and server load the backend with, so the runtime the router plans for is the one that runs.
The ``auto`` profile describes this machine: RAM, cores and onnxruntime execution providers are
detected when it is loaded, and its speed figures are rough per-core estimates.  ``smoledge doctor
--calibrate`` measures the speed and peak memory of one bundle on this device and stores them in the cache
folder per bundle (its file hashes), backend and device; the router applies that record when it serves
that bundle (:func:`apply_calibration`), never another bundle's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from smoledge.errors import ConfigError, SmolEdgeError
from smoledge.runtime.cache import cache_path
from smoledge.runtime.manifest import MeasuredMemory

MB = 1024 * 1024
_PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CoreMLExecutionProvider",
    "QNNExecutionProvider",
    "XnnpackExecutionProvider",
    "CPUExecutionProvider",
)


@dataclass(frozen=True)
class SpeedFigures:
    """Seconds per vision tile (or video frame), prompt tokens per second, new tokens per second."""

    tile_encode_s: float
    prefill_tok_s: float
    decode_tok_s: float
    source: str = "profile"  # "profile", "estimated" or "calibrated <date>"

    def to_json(self) -> dict:
        return {"tile_encode_s": self.tile_encode_s, "prefill_tok_s": self.prefill_tok_s,
                "decode_tok_s": self.decode_tok_s, "source": self.source}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    ram_bytes: int
    cores: int
    memory_budget_bytes: int
    max_image_tiles: int
    max_video_frames: int
    max_context: int
    backend: str
    execution_provider: str
    speed: SpeedFigures
    available_providers: tuple[str, ...] = ()
    bundle_verify: str = "fast"  # "full": hash every bundle file on each run (SD cards: bit rot keeps mtimes)
    # the bundle's memory figures measured on this device (apply_calibration); None: the manifest's
    memory: MeasuredMemory | None = None
    # bundle format -> the options its backend is loaded with on this device ({"onnx": {"vision_session": ...}})
    backend_options: dict = field(default_factory=dict)

    def options_for(self, fmt: str | None) -> dict:
        """The backend options this profile sets for format ``fmt`` (a copy; empty where it sets none)."""
        return dict(self.backend_options.get(fmt or "onnx", {}))


@dataclass(frozen=True)
class MachineInfo:
    ram_bytes: int
    cores: int
    providers: tuple[str, ...]


def profile_names() -> list[str]:
    folder = resources.files("smoledge.cloud_fallback") / "profiles"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_profile(name: str, *, cache_dir: Path | None = None, machine: MachineInfo | None = None) -> DeviceProfile:
    """Read profile ``name`` (``auto`` detects this machine unless ``machine`` is given).

    Calibrations are per bundle: the router applies the one of the bundle it serves (``apply_calibration``);
    ``cache_dir`` is accepted for callers of the per-profile layout and not read."""
    data = _read_profile_file(name)
    profile = _profile_from_json(data)
    if name == "auto":
        profile = _apply_machine(profile, data, machine or detect_machine())
    return profile


def _read_profile_file(name: str) -> dict:
    if name not in profile_names():
        raise ConfigError(
            f"unknown device profile {name!r}",
            hint=f"pick one of: {', '.join(profile_names())}",
        )
    path = resources.files("smoledge.cloud_fallback") / "profiles" / f"{name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"device profile {name!r} cannot be read: {err}", hint="reinstall smoledge") from err


def _profile_from_json(data: dict) -> DeviceProfile:
    try:
        speed = data["speed"]
        return DeviceProfile(
            name=str(data["name"]),
            description=str(data.get("description", "")),
            ram_bytes=int(data["ram_mb"]) * MB,
            cores=int(data["cores"]),
            memory_budget_bytes=int(data["memory_budget_mb"]) * MB,
            max_image_tiles=int(data["max_image_tiles"]),
            max_video_frames=int(data["max_video_frames"]),
            max_context=int(data["max_context"]),
            backend=str(data["backend"]),
            execution_provider=str(data["execution_provider"]),
            speed=SpeedFigures(float(speed["tile_encode_s"]), float(speed["prefill_tok_s"]),
                               float(speed["decode_tok_s"])),
            bundle_verify=_verify_mode(data.get("bundle_verify", "fast")),
            backend_options=_backend_options(data.get("backend_options", {})),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"device profile {data.get('name')!r} is malformed: {err}",
                          hint="compare it with the profiles shipped in cloud_fallback/profiles/") from err


def _backend_options(value) -> dict:
    """``{format: {option: scalar}}``; the backend checks the names and values when it loads."""
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError(f"backend_options must map a bundle format to an object of options, got {value!r}")
    for fmt, options in value.items():
        bad = [k for k, v in options.items() if not isinstance(v, (str, int, float, bool))]
        if bad:
            raise ValueError(f"backend_options.{fmt}: {', '.join(bad)} must be a string, number or true/false")
    return {str(fmt): dict(options) for fmt, options in value.items()}


def _verify_mode(value) -> str:
    if value not in ("fast", "full"):
        raise ValueError(f"bundle_verify must be 'fast' or 'full', got {value!r}")
    return value


def _apply_machine(profile: DeviceProfile, data: dict, machine: MachineInfo) -> DeviceProfile:
    per_core = data["speed_per_core"]
    cores = max(1, machine.cores)
    provider = next((p for p in _PREFERRED_PROVIDERS if p in machine.providers), "CPUExecutionProvider")
    speed = SpeedFigures(
        tile_encode_s=float(per_core["tile_encode_core_s"]) / cores,
        prefill_tok_s=float(per_core["prefill_tok_s"]) * cores,
        decode_tok_s=float(per_core["decode_tok_s"]) * cores,
        source="estimated",
    )
    return replace(
        profile,
        ram_bytes=machine.ram_bytes,
        cores=machine.cores,
        memory_budget_bytes=int(machine.ram_bytes * float(data["memory_budget_fraction"])),
        execution_provider=provider,
        available_providers=machine.providers,
        speed=speed,
    )


def detect_machine() -> MachineInfo:
    """RAM, logical cores and onnxruntime's execution providers of this machine."""
    return MachineInfo(ram_bytes=_total_ram(), cores=os.cpu_count() or 1, providers=_ort_providers())


def _total_ram() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    try:  # Windows and other platforms without sysconf
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return 0


def _ort_providers() -> tuple[str, ...]:
    try:
        import onnxruntime
    except ImportError:
        return ()
    return tuple(p for p in onnxruntime.get_available_providers() if p != "AzureExecutionProvider")


# --- calibration, stored per bundle and device --------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """What ``smoledge doctor --calibrate`` measured for one bundle, backend and device."""

    bundle: str  # bundle_key(manifest)
    backend: str
    device: str  # device_id()
    speed: SpeedFigures
    memory: MeasuredMemory | None
    model_id: str = ""
    # the backend options it was measured with (a profile's backend_options for this format; {} = the defaults):
    # the router applies the record only to a backend loaded with the same ones
    options: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"bundle": self.bundle, "backend": self.backend, "device": self.device, "model_id": self.model_id,
                "options": dict(self.options), "speed": self.speed.to_json(),
                "memory": None if self.memory is None else _dump_measured(self.memory)}


def bundle_key(manifest) -> str:
    """A bundle's identity: the hash of its file table (every artifact's sha256), not of its path."""
    table = {path: entry.sha256 for path, entry in sorted(manifest.files.items())}
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:20]


def device_id(machine: MachineInfo | None = None) -> str:
    """This device: CPU architecture and model, cores and RAM (a cache folder may be shared by machines)."""
    machine = machine or detect_machine()
    cpu = _cpu_model()
    tag = hashlib.sha256(cpu.encode()).hexdigest()[:8] if cpu else "cpu"
    return f"{platform.machine() or 'unknown'}-{machine.cores}c-{round(machine.ram_bytes / 2**30)}g-{tag}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def calibration_path(cache_dir: Path, bundle: str, backend: str, device: str) -> Path:
    return cache_path("calibration", cache_dir) / bundle / f"{backend}-{device}.json"


def legacy_calibrations(cache_dir: Path) -> list[Path]:
    """Per-profile records of older versions (``calibration/<profile>.json``): ignored, as they do not say
    which bundle they measured (one bundle's speed was applied to another)."""
    folder = cache_path("calibration", cache_dir)
    return sorted(p for p in folder.glob("*.json") if p.is_file()) if folder.is_dir() else []


def load_calibration(cache_dir: Path, bundle: str, backend: str, device: str | None = None) -> Calibration | None:
    path = calibration_path(cache_dir, bundle, backend, device or device_id())
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        speed = data["speed"]
        figures = SpeedFigures(float(speed["tile_encode_s"]), float(speed["prefill_tok_s"]),
                               float(speed["decode_tok_s"]), source=str(speed.get("source", "calibrated")))
        measured = data.get("memory")
        memory = None if measured is None else MeasuredMemory.from_dict(measured, str(path))
        options = data.get("options", {})
        if not isinstance(options, dict):
            raise ValueError(f"options must be an object, got {options!r}")
        return Calibration(str(data["bundle"]), str(data["backend"]), str(data["device"]), figures, memory,
                           str(data.get("model_id", "")), options)
    except (OSError, ValueError, KeyError, TypeError, SmolEdgeError) as err:
        raise ConfigError(f"calibration file {path} is unreadable: {err}",
                          hint="delete it and run `smoledge doctor --bundle B --calibrate` again") from err


def save_calibration(cache_dir: Path, calibration: Calibration) -> Path:
    path = calibration_path(cache_dir, calibration.bundle, calibration.backend, calibration.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(calibration.to_json(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def apply_calibration(profile: DeviceProfile, calibration: Calibration | None) -> DeviceProfile:
    """``profile`` with this bundle's measured speed and memory on this device (unchanged without one)."""
    if calibration is None:
        return profile
    return replace(profile, speed=calibration.speed, memory=calibration.memory)


def _dump_measured(memory: MeasuredMemory) -> dict:
    from dataclasses import asdict

    return asdict(memory)


def engine_format(engine) -> str | None:
    """The bundle format a local engine runs (``onnx``, ``executorch``, ...), where it says."""
    return getattr(getattr(engine, "backend", None), "name", None)


def calibrated_profile(profile: DeviceProfile, engine, cache_dir: Path | None) -> DeviceProfile:
    """``profile`` with the calibration of ``engine``'s bundle and backend on this device, if one is stored and
    was measured with the backend options this profile loads the backend with (``vision_session="exclusive"``
    peaks lower than the default: one measured with other options would mislead the router)."""
    if cache_dir is None or engine is None:
        return profile
    backend = engine_format(engine) or "onnx"
    record = load_calibration(cache_dir, bundle_key(engine.manifest), backend, _this_device())
    return apply_calibration(profile, record if calibration_applies(record, profile, backend) else None)


def calibration_applies(record: Calibration | None, profile: DeviceProfile, backend: str) -> bool:
    """Whether ``record`` was measured with the options ``profile`` gives ``backend``."""
    return record is not None and record.options == profile.options_for(backend)


@functools.lru_cache(maxsize=1)
def _this_device() -> str:
    return device_id()
