"""Pacing and control messages of live connections: the arithmetic, without a server."""

from __future__ import annotations

import pytest

from hark.audio import AudioError
from services.ingest.live import MAX_CONTROL_CHARS, control
from services.ingest.pacing import MIN_MESSAGE_S, Pacer


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_real_time_never_waits_and_a_burst_is_allowed_once():
    clock = Clock()
    p = Pacer(2.0, 10.0, clock)
    for _ in range(100):  # 200 ms messages every 200 ms
        assert p.spend(0.2) == 0.0
        clock.t += 0.2
    assert abs(p.lead()) < 1e-9
    assert p.spend(10.0) == 0.0  # a full bucket: 10 s at once
    assert p.spend(2.0) == pytest.approx(1.0)  # 2 s over: repaid at 2 s of audio a second


def test_a_flood_is_held_to_the_factor_and_runs_ahead_of_the_clock():
    clock = Clock()
    p = Pacer(2.0, 4.0, clock)
    for _ in range(50):  # the reader waits as told, the client always has the next message ready
        clock.t += p.spend(1.0)
    # 50 s of audio: 4 s of burst, the rest at 2x real time
    assert clock.t - 100.0 == pytest.approx((50 - 4) / 2.0, abs=0.5)
    assert p.lead() == pytest.approx(50 - 23, abs=0.5)  # what live.py refuses (too_fast)


def test_tiny_messages_cost_at_least_the_minimum():
    clock = Clock()
    p = Pacer(2.0, 0.0, clock)
    assert p.spend(0.0) == pytest.approx(MIN_MESSAGE_S / 2.0)
    with pytest.raises(ValueError):
        Pacer(0.5, 1.0, clock)


@pytest.mark.parametrize(
    "message",
    ["[" * 200_000, "[" * 3000, "{}", '{"type": 1}', '[{"type": "end"}]', "end", '{"type": "\\ud800"}', "x" * 5000],
)
def test_only_an_end_object_is_a_control_message(message):
    with pytest.raises(AudioError) as e:
        control(message)
    assert e.value.kind == "bad_message" and e.value.reason


def test_the_end_message_and_its_bounds():
    assert control('{"type": "end"}') == "end"
    assert control('{"type": "end", "n": 1e999999}') == "end"  # inf: still an end
    assert control('{"type": "end", "pad": "' + "x" * (MAX_CONTROL_CHARS - 32) + '"}') == "end"
