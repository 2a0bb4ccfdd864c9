from __future__ import annotations

from flask_sse_run.llm.metrics import StepMeter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rates_are_over_the_last_minute() -> None:
    clock = Clock()
    meter = StepMeter(clock=clock)
    clock.now += 60
    for _ in range(120):  # a minute at 2 steps/s of 16 tokens each
        meter.record(16)
        meter.record(16)
        clock.now += 1
    assert meter.rates() == {"steps_per_s": 2.0, "tokens_per_s": 32.0}
    clock.now += 30  # half a minute idle
    assert meter.rates() == {"steps_per_s": 1.0, "tokens_per_s": 16.0}
    clock.now += 31
    assert meter.rates() == {"steps_per_s": 0.0, "tokens_per_s": 0.0}


def test_a_young_meter_divides_by_its_age_and_counts_tokens_without_steps() -> None:
    clock = Clock()
    meter = StepMeter(clock=clock)
    meter.record(5, steps=0)  # a prefill's first tokens
    clock.now += 10
    for _ in range(10):
        meter.record(4)
    assert meter.rates() == {"steps_per_s": 1.0, "tokens_per_s": 4.5}
