"""The ONNX backend's memory levers (issue 14, "Memory"): the vision encoder's peak does not grow with the number
of vision-encoder calls, and a device profile's backend options are the options the backend runs with.

Peaks are measured in fresh child processes (runtime/memory_probe.py), never timed."""

from __future__ import annotations

import argparse
import json

import pytest

from smoledge.cloud_fallback.profiles import load_profile
from smoledge.errors import ConfigError
from smoledge.runtime import load
from smoledge.runtime.bundle import open_bundle
from smoledge.runtime.memory_probe import Probe, run_probe
from test_onnx_decoder import FIXTURE, greedy_tokens

# 10 tiles in 3 calls may cost at most this much more than 5 tiles in 2 calls, as a share of the 5-tile request's
# peak over the loaded process (measured: +4%; with the memory pattern on the vision session it was +71%)
GROWTH_BOUND = 0.15


def test_the_sessions_get_their_own_options(tiny_fp32_bundle):
    """The vision session runs without the memory pattern (its batch shapes vary), the decoder and embeddings
    with it; every session shares the arena switch."""
    pipe = load(tiny_fp32_bundle, vision_session="keep")
    opts = {name: s.get_session_options() for name, s in pipe.backend.sessions.items()}
    assert set(opts) == {"embed_tokens", "decoder", "vision_encoder"}
    assert [name for name, o in opts.items() if not o.enable_mem_pattern] == ["vision_encoder"]
    assert all(o.enable_cpu_mem_arena for o in opts.values())


@pytest.mark.parametrize("options, shrink", [({}, "cpu:0"), ({"shrink_arena": False}, None),
                                             ({"memory_arena": False}, None)])
def test_vision_calls_and_prefills_shrink_the_arena_unless_told_not_to(options, shrink, tiny_fp32_bundle):
    """The run options of vision calls and prefills ask onnxruntime to shrink the CPU arena; never with the arena
    off (onnxruntime refuses that), and answers are unchanged."""
    pipe = load(tiny_fp32_bundle, **options)
    key = "memory.enable_memory_arena_shrinkage"
    if shrink:
        assert pipe.backend._shrink.get_run_config_entry(key) == shrink
    else:
        with pytest.raises(RuntimeError, match="does not have configuration"):
            pipe.backend._shrink.get_run_config_entry(key)
    assert greedy_tokens(pipe, "one-image", 4) == json.loads(FIXTURE.read_text())["tokens"]["fp32"]["one-image"][:4]


@pytest.mark.parametrize("case", ["one-image", "two-images"])
def test_the_exclusive_mode_frees_the_decoder_while_it_encodes_and_answers_the_same(case, tiny_fp32_bundle):
    """vision_session="exclusive": the decoder's session is gone while the vision encoder runs and the vision
    encoder's after it; the prefill creates the decoder again, the KV cache (the backend's own buffers) is not
    touched, and the greedy tokens are the recorded ones."""
    pipe = load(tiny_fp32_bundle, vision_session="exclusive")
    backend, held = pipe.backend, []
    encode = backend.encode_images

    def watching(*args):
        held.append(sorted(backend.sessions))  # before the encode: the decoder is still there
        out = encode(*args)
        held.append(sorted(backend.sessions))
        return out

    backend.encode_images = watching
    assert greedy_tokens(pipe, case, 8) == json.loads(FIXTURE.read_text())["tokens"]["fp32"][case][:8]
    assert held[0] == ["decoder", "embed_tokens"] and held[-1] == ["embed_tokens"]
    assert sorted(backend.sessions) == ["decoder", "embed_tokens"]  # the prefill loaded it again


def test_an_unknown_backend_option_is_a_config_error(tiny_fp32_bundle):
    with pytest.raises(ConfigError, match="no option 'vision_sesion'") as err:
        load(tiny_fp32_bundle, vision_sesion="release")
    assert "vision_session" in err.value.hint


def test_the_4gb_pi_profile_runs_the_vision_session_exclusively(tiny_fp32_bundle):
    """The profile's backend_options reach the backend the CLI loads (run and serve share load_pipeline), and a
    flag given on the command line still wins over the profile."""
    from smoledge.run import load_pipeline

    pi = load_profile("raspberry-pi-5-4gb")
    assert pi.options_for("onnx") == {"vision_session": "exclusive"} and pi.options_for("executorch") == {}
    assert load_profile("raspberry-pi-5-8gb").options_for("onnx") == {}
    args = argparse.Namespace(backend=None, threads=0, providers=None)
    pipe = load_pipeline(tiny_fp32_bundle, args, verify=False, profile=pi)
    assert pipe.backend.options.vision_session == "exclusive" and "vision_encoder" not in pipe.backend.sessions
    assert load_pipeline(tiny_fp32_bundle, args, verify=False).backend.options.vision_session == "lazy"
    args = argparse.Namespace(backend="onnx", threads=1, providers=None)
    pipe = load_pipeline(tiny_fp32_bundle, args, verify=False, profile=pi)
    assert pipe.backend.options.threads == 1 and pipe.backend.options.vision_session == "exclusive"


def test_malformed_backend_options_in_a_profile_are_a_config_error():
    from smoledge.cloud_fallback.profiles import _profile_from_json, _read_profile_file

    data = _read_profile_file("raspberry-pi-5-4gb")
    for bad in ({"onnx": "release"}, {"onnx": {"vision_session": ["release"]}}):
        with pytest.raises(ConfigError, match="backend_options"):
            _profile_from_json({**data, "backend_options": bad})


def test_the_probe_child_loads_the_backend_with_the_given_options(tiny_int4_bundle):
    """An option the backend rejects fails the child: the options really reach it."""
    from smoledge.errors import BackendError

    with pytest.raises(BackendError, match="no option 'nonsense'"):
        run_probe(tiny_int4_bundle, "onnx", Probe(1), options={"nonsense": 1})


@pytest.mark.slow
def test_the_vision_peak_does_not_grow_with_vision_calls(realtext_int4_bundle):
    """Real-text bundle (512-px tiles, one tile per image, 4 tiles per vision-encoder call): 5 images are two calls,
    10 images three; the third call must not add more than GROWTH_BOUND of the request's vision-and-prefill peak.
    The profile's release mode must not raise the peak either."""
    tile = open_bundle(realtext_int4_bundle, verify=False).manifest.image.tile_size
    five, ten = (run_probe(realtext_int4_bundle, "onnx", Probe(1, (tile, tile), images=n)) for n in (5, 10))
    released = run_probe(realtext_int4_bundle, "onnx", Probe(1, (tile, tile), images=10),
                         options=load_profile("raspberry-pi-5-4gb").options_for("onnx"))
    growth = (ten.peak_rss - five.peak_rss) / (five.peak_rss - five.load_rss)
    print(json.dumps({"5 images MB": five.peak_rss // 10**6, "10 images MB": ten.peak_rss // 10**6,
                      "10 images, released MB": released.peak_rss // 10**6, "growth": round(growth, 3)}))
    assert (five.tiles, ten.tiles) == (5, 10)
    assert growth <= GROWTH_BOUND, (five.peak_rss, ten.peak_rss)
    assert released.peak_rss <= ten.peak_rss * 1.05
