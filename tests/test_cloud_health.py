"""Local health that recovers (issue 16, B): crashes and first-token misses counted apart, a half-open
try after a cool-off or every Nth request, one probe at a time across threads.  Pure: a fake clock."""

from __future__ import annotations

import threading

from test_cloud_fakes import MANIFEST

from smoledge.cloud_fallback import HealthTracker, LocalHealth, PolicyConfig, decide, load_profile
from smoledge.errors import BackendError, DeadlineExceededError
from smoledge.runtime.types import RequestShape


# --- B: local health that recovers ---------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _fail(tracker):
    health = tracker.begin()
    tracker.record(True, BackendError("kernel crashed"), probe=health.probe)
    return health


def test_b_local_health_half_opens_after_the_cool_off_and_a_success_closes_it():
    clock = _Clock()
    policy = PolicyConfig(local_retry_after_s=30.0, local_retry_every=0)
    tracker = HealthTracker(policy, clock=clock)
    for _ in range(3):
        assert not _fail(tracker).probe
    assert tracker.current.consecutive_failures == 3
    for _ in range(5):  # open: requests go away, no probe before the cool-off
        health = tracker.begin()
        assert not health.probe and health.skips_local(policy)
    clock.now += 30.0
    probe = tracker.begin()
    assert probe.probe and not probe.skips_local(policy)
    assert not tracker.begin().probe  # one probe at a time
    tracker.record(True, None, probe=True)
    assert tracker.current == LocalHealth() and not tracker.begin().skips_local(policy)


def test_b_a_failed_probe_waits_another_cool_off_and_every_nth_request_probes():
    clock = _Clock()
    policy = PolicyConfig(local_retry_after_s=30.0, local_retry_every=4)
    tracker = HealthTracker(policy, clock=clock)
    for _ in range(3):
        _fail(tracker)
    probes = [tracker.begin().probe for _ in range(4)]
    assert probes == [False, False, False, True]  # the 4th request sent away tries local
    tracker.record(True, BackendError("still broken"), probe=True)
    clock.now += 10.0
    assert [tracker.begin().probe for _ in range(3)] == [False, False, False]


def test_b_first_token_deadline_misses_are_counted_apart_from_crashes():
    health = LocalHealth()
    for _ in range(2):
        health = health.after(DeadlineExceededError("no first token from the local engine within 2 s"))
    health = health.after(BackendError("kernel crashed"))
    assert (health.deadline_misses, health.consecutive_failures) == (2, 1)
    health = health.after(DeadlineExceededError("no first token"))
    policy = PolicyConfig()
    assert health.skips_local(policy)
    shape = RequestShape(prompt_tokens=10, max_new_tokens=8, image_tiles=0, images=0)
    d = decide(shape, MANIFEST, load_profile("raspberry-pi-5-4gb"), health, policy)
    assert d.route == "cloud" and d.reason == "local engine missed the first-token deadline 3 times in a row"
    assert health.after(None) == LocalHealth()


def test_b_health_is_shared_correctly_across_threads():
    clock = _Clock()
    tracker = HealthTracker(PolicyConfig(local_retry_after_s=5.0, local_retry_every=0), clock=clock)
    for _ in range(3):
        _fail(tracker)
    clock.now += 5.0
    seen, start = [], threading.Barrier(16)

    def one():
        start.wait()
        seen.append(tracker.begin().probe)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen.count(True) == 1
