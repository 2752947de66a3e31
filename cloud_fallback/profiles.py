"""Device profiles: what a device can hold and how fast it runs, as data.

A profile is a JSON file in ``profiles/`` (one per device) read into a frozen :class:`DeviceProfile`.
The ``auto`` profile describes this machine: RAM, cores and onnxruntime execution providers are
detected when it is loaded, and its speed figures are rough per-core estimates.  ``smoledge doctor
--calibrate`` measures the speed figures and stores them per device in the cache folder; a stored
calibration overrides the file's figures whenever the profile is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from smoledge.errors import ConfigError

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


@dataclass(frozen=True)
class MachineInfo:
    ram_bytes: int
    cores: int
    providers: tuple[str, ...]


def profile_names() -> list[str]:
    folder = resources.files("smoledge.cloud_fallback") / "profiles"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_profile(name: str, *, cache_dir: Path | None = None, machine: MachineInfo | None = None) -> DeviceProfile:
    """Read profile ``name`` (``auto`` detects this machine unless ``machine`` is given) + its calibration."""
    data = _read_profile_file(name)
    profile = _profile_from_json(data)
    if name == "auto":
        profile = _apply_machine(profile, data, machine or detect_machine())
    if cache_dir is not None:
        calibrated = load_calibration(cache_dir, profile.name)
        if calibrated is not None:
            profile = replace(profile, speed=calibrated)
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
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"device profile {data.get('name')!r} is malformed: {err}",
                          hint="compare it with the profiles shipped in cloud_fallback/profiles/") from err


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


# --- calibration, stored per device -------------------------------------------------------------

def calibration_path(cache_dir: Path, profile_name: str) -> Path:
    return Path(cache_dir) / "calibration" / f"{profile_name}.json"


def load_calibration(cache_dir: Path, profile_name: str) -> SpeedFigures | None:
    path = calibration_path(cache_dir, profile_name)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return SpeedFigures(float(data["tile_encode_s"]), float(data["prefill_tok_s"]),
                            float(data["decode_tok_s"]), source=str(data.get("source", "calibrated")))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"calibration file {path} is unreadable: {err}",
                          hint="delete it and run `smoledge doctor --bundle B --calibrate` again") from err


def save_calibration(cache_dir: Path, profile_name: str, speed: SpeedFigures, *, extra: dict | None = None) -> Path:
    path = calibration_path(cache_dir, profile_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**speed.to_json(), **(extra or {})}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
