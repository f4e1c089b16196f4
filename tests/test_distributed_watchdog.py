"""A rank that hears nothing from the others for --comm-timeout seconds ends itself with one line
(model/parallel/watchdog.py), on a made-up clock: beats postpone it, a stopped watchdog never fires."""
import threading

import pytest

from model.parallel.watchdog import EXIT_HUNG, Watchdog


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def watch(clock, timeout=60.0):
    said, exits, fired = [], [], threading.Event()

    def exit(code):
        exits.append(code)
        fired.set()
    return Watchdog(timeout, "rank 1", say=said.append, exit=exit, clock=clock, poll=0.01), said, exits, fired


def test_silence_past_the_timeout_ends_the_rank_with_one_line():
    clock = Clock()
    dog, said, exits, fired = watch(clock)
    clock.now = 1000.0  # before the first collective: not armed
    assert not fired.wait(0.1)
    clock.now = 0.0
    dog.beat()
    clock.now = 61.0
    assert fired.wait(5)
    assert exits == [EXIT_HUNG] and said == ["ptxgen train: rank 1: no collective in 61 s (another rank died or "
                                             "hung, or --comm-timeout 60 is too short); stopping"]
    dog.stop()


def beaten_every_30_s_for_10_minutes(clock, dog, fired) -> bool:
    """Whether the watchdog fired although beaten every 30 s (its timeout is 60)."""
    for t in range(0, 600, 30):
        clock.now = float(t)
        dog.beat()
        if fired.wait(0.05):
            return True
    return False


def test_beats_keep_a_rank_alive_and_a_stopped_watchdog_never_fires():
    clock = Clock()
    dog, said, exits, fired = watch(clock)
    assert not beaten_every_30_s_for_10_minutes(clock, dog, fired)
    dog.stop()
    clock.now = 10_000.0
    assert not fired.wait(0.1) and said == [] and exits == []


def test_planted_beats_that_do_not_count_are_caught(monkeypatch):
    """A watchdog that measures silence from its first beat, not from the last, would stop a
    healthy rank after the timeout: the keep-alive check sees it fire."""
    def first_beat_only(self):
        if self._last is None:
            self._last = self._clock()
    monkeypatch.setattr(Watchdog, "beat", first_beat_only)
    clock = Clock()
    dog, _, exits, fired = watch(clock)
    assert beaten_every_30_s_for_10_minutes(clock, dog, fired) and exits == [EXIT_HUNG]
    dog.stop()


def test_a_timeout_must_be_positive():
    with pytest.raises(ValueError, match="positive timeout"):
        Watchdog(0, "rank 0")
