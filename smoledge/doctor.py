"""``smoledge doctor``: what this device can run, whether the cloud can be reached, and calibration.

Without ``--bundle`` it prints the device profile, what was detected (RAM, cores, onnxruntime execution
providers) and the cloud's state: off (and why), or on with or without a token, and whether the router
answers ``GET /models``.  With ``--bundle B`` it also says what of that bundle fits (tiles, tokens, a typical
photo); ``--calibrate`` times a short run of the bundle, measures its peak memory in child processes
(:mod:`smoledge.runtime.memory_probe`) and stores both for this bundle, backend and device in the cache
folder, where the router finds them whenever it serves that bundle (never another one's).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from smoledge.errors import BackendUnavailableError, ConfigError, SmolEdgeError

from smoledge.cloud_fallback.calibrate import calibrate, capabilities
from smoledge.cloud_fallback.config import default_cache_dir, env_flag, hub_offline
from smoledge.cloud_fallback.profiles import (
    Calibration,
    DeviceProfile,
    apply_calibration,
    bundle_key,
    calibration_applies,
    detect_machine,
    device_id,
    engine_format,
    legacy_calibrations,
    load_calibration,
    load_profile,
    profile_names,
    save_calibration,
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=None, metavar="P",
                        help="device profile (default $SMOLEDGE_PROFILE or 'auto' = this machine)")
    parser.add_argument("--bundle", type=Path, default=None, metavar="B", help="a bundle folder to check against")
    parser.add_argument("--calibrate", action="store_true",
                        help="time a short run of --bundle, measure its peak memory, and store both for this device")
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
    report: dict = {"machine": asdict(detect_machine()), "device": device_id(), "cache_dir": str(cache_dir),
                    "never_cloud": env_flag(os.environ, "SMOLEDGE_NO_CLOUD"), "offline": hub_offline()}
    report["cloud"] = cloud_check(report)
    profile = load_profile(name)
    if args.bundle is not None:
        options = profile.options_for("onnx")  # the runtime's default backend, loaded as run and serve load it
        engine = load_engine(args.bundle, options)
        key, backend = bundle_key(engine.manifest), engine_format(engine) or "onnx"
        if args.calibrate:
            record = calibrate_bundle(engine, key, backend, report["device"], options)
            report["calibration_file"] = str(save_calibration(cache_dir, record))
        record = load_calibration(cache_dir, key, backend, report["device"])
        applies = calibration_applies(record, profile, backend)
        if record is not None and not applies:
            report["calibration_ignored"] = (f"measured with backend options {record.options or 'the defaults'}, "
                                             f"not this profile's {profile.options_for(backend) or 'defaults'}")
        profile = apply_calibration(profile, record if applies else None)
        report["bundle"] = {"path": str(args.bundle), "model_id": engine.manifest.source.model_id, "key": key,
                            "backend": backend, "calibrated": applies,
                            **asdict(capabilities(engine.manifest, profile, backend=backend))}
    report["legacy_calibrations"] = [str(p) for p in legacy_calibrations(cache_dir)]
    report["profile"] = asdict(profile)
    print(json.dumps(report, indent=2) if args.json else render(report, profile))
    return 0


def calibrate_bundle(engine, key: str, backend: str, device: str, options: dict | None = None) -> Calibration:
    """Speed from a short run of ``engine``; peak memory from child processes loading its bundle folder with the
    same backend ``options`` (a profile's), which the record keeps."""
    speed = calibrate(engine)
    memory = None
    folder = getattr(getattr(engine, "bundle", None), "path", None)
    if folder is not None:
        from smoledge.runtime.memory_probe import measure_memory

        loaded = getattr(getattr(engine, "backend", None), "options", None)
        memory = measure_memory(Path(folder), backend, vision_batch=getattr(loaded, "vision_batch", 4),
                                options=options)
    return Calibration(key, backend, device, speed, memory, engine.manifest.source.model_id, dict(options or {}))


def load_engine(bundle: Path, options: dict | None = None):
    """The runtime's engine for ``bundle``, its backend loaded with ``options`` (imported here so ``doctor`` works
    without a runtime)."""
    try:
        from smoledge.runtime import load
    except ImportError as err:
        raise BackendUnavailableError("the local runtime (smoledge.runtime.load) is not available in this install",
                                      hint="install smoledge with its runtime, or run doctor without --bundle") from err
    return load(bundle, **(options or {}))


def cloud_check(report: dict, env=None) -> dict:
    """Whether the cloud fallback can work: off and why, a token present or not, and the router's answer to
    ``GET /models`` (one call of at most a few seconds; the token is never printed)."""
    env = os.environ if env is None else env
    if report["never_cloud"]:
        return {"state": "off", "why": "SMOLEDGE_NO_CLOUD"}
    if report["offline"]:
        return {"state": "off", "why": "HF_HUB_OFFLINE"}
    from smoledge.cloud_fallback.config import CloudConfig, DEFAULT_BASE_URL

    config = CloudConfig(base_url=env.get("SMOLEDGE_CLOUD_BASE_URL") or DEFAULT_BASE_URL)
    out: dict = {"state": "on", "base_url": config.base_url, "token": _token_present()}
    if not out["token"]:
        return out
    try:
        from smoledge.cloud_fallback.client import RouterClient
        from smoledge.cloud_fallback.cloud import CloudFallback

        token = CloudFallback(config).token()
        with RouterClient(config) as client:
            out["models_listed"] = len(client.list_models(token))
        out["router"] = "answers"
    except SmolEdgeError as err:
        out["router"] = f"does not answer: {err.message}"
    return out


def _token_present() -> bool:
    try:
        from huggingface_hub import get_token
    except ImportError:
        return bool(os.environ.get("HF_TOKEN"))
    return bool(get_token())


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
        f"  cloud fallback: {_cloud_state(report['cloud'])}",
    ]
    bundle = report.get("bundle")
    if bundle:
        lines += _bundle_lines(bundle)
    if "calibration_file" in report:
        lines.append(f"calibration stored in {report['calibration_file']}")
    elif "calibration_ignored" in report:
        lines.append(f"this device's calibration of the bundle is not applied: {report['calibration_ignored']}; "
                     "run `smoledge doctor --bundle B --profile P --calibrate` with the profile you run with")
    elif not (bundle and bundle["calibrated"]):
        lines.append("speed and memory are not measured on this device for a bundle; "
                     "run `smoledge doctor --bundle B --calibrate`")
    if report["legacy_calibrations"]:
        lines.append(f"ignored {len(report['legacy_calibrations'])} per-profile calibration file(s) of an older "
                     "version (they do not say which bundle they measured); calibrate each bundle again")
    return "\n".join(lines)


def _bundle_lines(bundle: dict) -> list[str]:
    source = "calibrated here" if bundle["calibrated"] else bundle["memory_source"]
    return [
        f"bundle {bundle['path']} ({bundle['model_id']}), {bundle['backend']}:",
        f"  weights {'fit' if bundle['weights_fit'] else 'DO NOT fit'} in the budget; up to "
        f"{bundle['max_tiles']} tiles and {bundle['max_tokens']:,} tokens run locally (memory: {source})",
        f"  a typical photo ({bundle['typical_tiles']} tiles, 256 new tokens): first token in "
        f"~{bundle['typical_first_token_s']:.1f} s, done in ~{bundle['typical_total_s']:.1f} s, "
        f"peak {_gb(bundle['typical_peak_bytes'])}"
        + ("" if bundle["typical_fits"] else "; does not fit: --max-tiles auto answers it with fewer tiles"),
    ]


def _cloud_state(cloud: dict) -> str:
    if cloud["state"] == "off":
        return f"OFF ({cloud['why']})"
    if not cloud["token"]:
        return (f"on, but no Hugging Face token is set (HF_TOKEN or `hf auth login`): requests that do not fit "
                f"here fail instead of going to {cloud['base_url']}")
    if cloud.get("router") == "answers":
        return f"on: token present, {cloud['base_url']} answers ({cloud['models_listed']} models listed)"
    return f"on: token present, but {cloud['base_url']} {cloud.get('router')}"


def _gb(value: int) -> str:
    return f"{value / 1e9:.1f} GB"
