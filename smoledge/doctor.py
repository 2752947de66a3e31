"""``smoledge doctor``: what this device can run, and calibration of its speed figures.

Without ``--bundle`` it prints the device profile and what was detected (RAM, cores, onnxruntime
execution providers).  With ``--bundle B`` it also says what of that bundle fits (tiles, tokens, a
typical one-image request); ``--calibrate`` times a short run and stores the speed figures for this
device in the cache folder, where every later load of the profile picks them up.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from smoledge.errors import BackendUnavailableError, ConfigError

from smoledge.cloud_fallback.calibrate import calibrate, capabilities
from smoledge.cloud_fallback.config import default_cache_dir, env_flag, hub_offline
from smoledge.cloud_fallback.profiles import DeviceProfile, detect_machine, load_profile, profile_names, save_calibration


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=None, metavar="P",
                        help="device profile (default $SMOLEDGE_PROFILE or 'auto' = this machine)")
    parser.add_argument("--bundle", type=Path, default=None, metavar="B", help="a bundle folder to check against")
    parser.add_argument("--calibrate", action="store_true",
                        help="time a short run of --bundle and store the speed figures for this device")
    parser.add_argument("--list", action="store_true", help="list the device profiles")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def main(args: argparse.Namespace) -> int:
    if args.list:
        for name in profile_names():
            print(f"{name:24s} {load_profile(name).description}")
        return 0
    if args.calibrate and args.bundle is None:
        raise ConfigError("--calibrate needs a bundle to time", hint="add --bundle PATH")
    cache_dir = default_cache_dir()
    name = args.profile or os.environ.get("SMOLEDGE_PROFILE") or "auto"
    report: dict = {"machine": asdict(detect_machine()), "cache_dir": str(cache_dir),
                    "never_cloud": env_flag(os.environ, "SMOLEDGE_NO_CLOUD"), "offline": hub_offline()}
    if args.bundle is not None:
        engine = load_engine(args.bundle)
        if args.calibrate:
            speed = calibrate(engine)
            model = engine.manifest.source.model_id
            report["calibration_file"] = str(save_calibration(cache_dir, name, speed, extra={"model_id": model}))
        profile = load_profile(name, cache_dir=cache_dir)
        report["bundle"] = {"path": str(args.bundle), "model_id": engine.manifest.source.model_id,
                            **asdict(capabilities(engine.manifest, profile))}
    else:
        profile = load_profile(name, cache_dir=cache_dir)
    report["profile"] = asdict(profile)
    print(json.dumps(report, indent=2) if args.json else render(report, profile))
    return 0


def load_engine(bundle: Path):
    """The runtime's engine for ``bundle`` (imported here so ``doctor`` works without a runtime)."""
    try:
        from smoledge.runtime import load
    except ImportError as err:
        raise BackendUnavailableError("the local runtime (smoledge.runtime.load) is not available in this install",
                                      hint="install smoledge with its runtime, or run doctor without --bundle") from err
    return load(bundle)


def render(report: dict, profile: DeviceProfile) -> str:
    m = report["machine"]
    lines = [
        f"this machine: {_gb(m['ram_bytes'])} RAM, {m['cores']} cores, "
        f"onnxruntime providers: {', '.join(m['providers']) or 'onnxruntime not installed'}",
        f"profile {profile.name}: {profile.description}",
        f"  memory budget {_gb(profile.memory_budget_bytes)}, up to {profile.max_image_tiles} image tiles, "
        f"{profile.max_video_frames} video frames, {profile.max_context:,} tokens of context",
        f"  backend {profile.backend} with {profile.execution_provider}",
        f"  speed ({profile.speed.source}): {profile.speed.tile_encode_s:.3g} s per tile, "
        f"{profile.speed.prefill_tok_s:.4g} prompt tok/s, {profile.speed.decode_tok_s:.4g} new tok/s",
        f"  cloud fallback: {_cloud_state(report)}",
    ]
    bundle = report.get("bundle")
    if bundle:
        lines += [
            f"bundle {bundle['path']} ({bundle['model_id']}):",
            f"  weights {'fit' if bundle['weights_fit'] else 'DO NOT fit'} in the budget; up to "
            f"{bundle['max_tiles']} tiles and {bundle['max_tokens']:,} tokens run locally",
            f"  a typical photo ({bundle['typical_tiles']} tiles, 256 new tokens): first token in "
            f"~{bundle['typical_first_token_s']:.1f} s, done in ~{bundle['typical_total_s']:.1f} s, "
            f"peak {_gb(bundle['typical_peak_bytes'])}",
        ]
    if "calibration_file" in report:
        lines.append(f"calibration stored in {report['calibration_file']}")
    elif profile.speed.source in ("estimated", "profile"):
        lines.append("speed figures are not measured here; run `smoledge doctor --bundle B --calibrate`")
    return "\n".join(lines)


def _cloud_state(report: dict) -> str:
    if report["never_cloud"]:
        return "OFF (SMOLEDGE_NO_CLOUD)"
    return "OFF (HF_HUB_OFFLINE)" if report.get("offline") else "allowed"


def _gb(value: int) -> str:
    return f"{value / 1e9:.1f} GB"
