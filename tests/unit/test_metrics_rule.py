"""The per-job metrics rule (worker/metrics_rule.py): every step while a job is slow, window
aggregates above METRICS_MAX_POINTS_PER_S, back to every step when it slows down; and the
sink that applies it tags the run with the rule it used. The clock is driven by the tests."""

from __future__ import annotations

import uuid

import pytest
from mlflow.tracking import MlflowClient

from worker.metrics_rule import EVERY_STEP, RULE_TAG, WINDOW_METRIC, StepMetricsRule, point_steps, window_for_rate
from worker.metrics_sink import MlflowMetricSink
from worker.monitor import JobReporter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rows(first: int, n: int) -> list[tuple[int, dict[str, float]]]:
    """Per-step rows as the trainer reports them: loss falls and wiggles, lr falls, norms vary."""
    return [(s, {"train_loss": 1.0 / (s + 1) + (s % 3) * 0.1, "lr": 0.1 - s * 1e-5, "grad_norm": float(s % 7)})
            for s in range(first, first + n)]  # fmt: skip


def feed(rule: StepMetricsRule, clock: Clock, steps_per_s: float, seconds: float, first: int, chunk: int = 32) -> tuple[list, int]:
    """The trainer's windows of `chunk` steps at a given step rate; (rows out, next step)."""
    out, step = [], first
    for _ in range(round(steps_per_s * seconds / chunk)):
        clock.now += chunk / steps_per_s
        out += rule.thin(rows(step, chunk))
        step += chunk
    return out, step


def by_metric(out: list) -> dict[str, list[tuple[int, float]]]:
    history: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in out:
        for key, value in metrics.items():
            history.setdefault(key, []).append((step, value))
    return history


def test_a_slow_job_logs_every_step() -> None:
    clock = Clock()
    rule = StepMetricsRule(150, clock=clock)
    out, end = feed(rule, clock, steps_per_s=40, seconds=8, first=0, chunk=8)  # 120 points/s
    history = by_metric(out)
    assert [s for s, _ in history["train_loss"]] == list(range(end))
    assert history["train_loss"] == [(s, m["train_loss"]) for s, m in rows(0, end)]
    assert WINDOW_METRIC not in history  # only logged where the window size changes
    assert rule.description == EVERY_STEP
    assert rule.flush() == []


def test_a_fast_job_logs_window_means_with_their_spread_at_each_window_s_last_step() -> None:
    clock = Clock()
    rule = StepMetricsRule(150, clock=clock)
    out, end = feed(rule, clock, steps_per_s=1000, seconds=5, first=0)
    out += rule.flush()
    n = window_for_rate(1000, 3, 3, 150)
    assert n == 64  # 1000 / 32 windows x 6 points = 187 > 150; / 64 x 6 = 94
    history = by_metric(out)
    changes = history[WINDOW_METRIC]
    assert changes[-1][1] == n
    start = changes[-1][0]  # the first step of the n-step windows
    windowed = [(s, v) for s, v in history["train_loss"] if s >= start]
    truth = dict((s, m) for s, m in rows(0, end))
    ends = list(range(start + n - 1, end, n))  # each window's last step...
    if ends[-1] != end - 1:
        ends.append(end - 1)  # ...and the last, partial one, closed by flush()
    assert [s for s, _ in windowed] == ends
    for previous, (step, mean) in zip([start - 1] + ends[:-1], windowed):
        steps = range(previous + 1, step + 1)
        n = len(steps)
        losses = [truth[s]["train_loss"] for s in steps]
        assert mean == pytest.approx(sum(losses) / n)
        assert dict(history["train_loss_window_min"])[step] == min(losses)
        assert dict(history["train_loss_window_max"])[step] == max(losses)
        assert dict(history["grad_norm_window_max"])[step] == max(truth[s]["grad_norm"] for s in steps)
        assert dict(history["grad_norm"])[step] == pytest.approx(sum(truth[s]["grad_norm"] for s in steps) / n)
        assert dict(history["lr"])[step] == truth[step]["lr"]  # lr: its value at that step
    # No step lost: before the windows every step, then every step in exactly one window.
    assert [s for s, _ in history["train_loss"] if s < start] == list(range(start))
    # Bounded: after the first measurement the job sends under the limit.
    late = [m for s, m in out if s >= end - 3000]
    assert sum(len(m) for m in late) / 3 <= 150
    assert rule.description.startswith("mean of N-step windows above 150 points/s")
    assert "train_loss_window_min" in rule.description and ", 64 " in rule.description


def test_a_job_that_slows_down_goes_back_to_every_step_and_its_last_window_is_closed() -> None:
    clock = Clock()
    rule = StepMetricsRule(150, clock=clock)
    out, step = feed(rule, clock, steps_per_s=1000, seconds=3, first=0)
    assert rule.window_steps > 1
    slow, end = feed(rule, clock, steps_per_s=20, seconds=6, first=step, chunk=4)
    assert rule.window_steps == 1
    history = by_metric(out + slow)
    assert history[WINDOW_METRIC][-1][1] == 1.0
    back_at = history[WINDOW_METRIC][-1][0]
    # The last window before the change ends at the step before it; then every step again.
    assert max(s for s, _ in history["train_loss"] if s < back_at) == back_at - 1
    assert [s for s, _ in history["train_loss"] if s >= back_at] == list(range(back_at, end))
    assert rule.description.startswith("mean of N-step windows")  # the run used windows: the tag keeps saying so


def test_a_rate_just_under_a_boundary_does_not_flap() -> None:
    clock = Clock()
    rule = StepMetricsRule(150, clock=clock)
    feed(rule, clock, steps_per_s=1000, seconds=3, first=0)
    n = rule.window_steps
    feed(rule, clock, steps_per_s=1000 * 0.9, seconds=5, first=3008)  # 10 % slower: under the 20 % margin
    assert rule.window_steps == n


def test_zero_means_every_step_whatever_the_rate() -> None:
    clock = Clock()
    rule = StepMetricsRule(0, clock=clock)
    out, end = feed(rule, clock, steps_per_s=5000, seconds=2, first=0)
    assert [s for s, _ in by_metric(out)["train_loss"]] == list(range(end))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")


def test_the_sink_tags_the_run_with_its_rule_and_a_checkpoint_closes_the_open_window(store: MlflowClient) -> None:
    # A job's run is created saying "every step" (worker/mlflow_run.open_run); the sink retags a change.
    experiment = store.create_experiment(f"rule-{uuid.uuid4().hex[:6]}")
    run_id = store.create_run(experiment, tags={RULE_TAG: EVERY_STEP}).info.run_id
    clock = Clock()
    sink = MlflowMetricSink(store, lambda: (run_id, {}), flush_interval_s=3600, buffer_limit=100_000,
                            max_points_per_s=150, clock=clock)  # fmt: skip
    try:
        reporter = JobReporter(sink)
        reporter.log_metric_rows(rows(0, 32))
        assert sink.flush_once()
        assert store.get_run(run_id).data.tags[RULE_TAG] == EVERY_STEP
        step = 32
        for _ in range(40):  # 1000 steps/s
            clock.now += 0.032
            reporter.log_metric_rows(rows(step, 32))
            step += 32
        reporter.log_metrics(step, {"epoch": 1.0, "val_accuracy": 0.5})  # not a per-step row: as it is
        reporter.log_metric_rows(rows(step, 5))  # a window left half full...
        reporter.save_checkpoint(step + 4, lambda: {"w": 1})  # ...closed before the checkpoint counts what it needs
        assert reporter.pending_checkpoint.metrics_needed == sink.added
        assert sink.flush_once()
        tags = store.get_run(run_id).data.tags
        assert tags[RULE_TAG].startswith("mean of N-step windows above 150 points/s")
        history = [m.step for m in store.get_metric_history(run_id, "train_loss")]
        assert history[-1] == step + 4
        assert [m.step for m in store.get_metric_history(run_id, "val_accuracy")] == [step]
        assert store.get_metric_history(run_id, "train_loss_window_max")
    finally:
        sink.discard()


def test_a_job_logs_every_step_until_it_has_run_its_burst_ahead_of_the_rate() -> None:
    clock = Clock()
    rule = StepMetricsRule(150, burst_points=3000, clock=clock)
    out, end = feed(rule, clock, steps_per_s=1000, seconds=4, first=0)
    history = by_metric(out)
    start = history[WINDOW_METRIC][0][0]  # where the windows began
    every = [s for s, _ in history["train_loss"] if s < start]
    assert every == list(range(start))
    # 3 points a step: the allowance (3000 points, plus 150 a second meanwhile) lasts about 1,050
    # steps; the rate is then measured over at least a quarter of a second.
    assert 1000 <= start <= 1350, start
    assert rule.window_steps == 64
    assert "once 3000 points ahead of that rate" in rule.description
    # A short fast job never spends it: every step, and the tag says so.
    short = StepMetricsRule(150, burst_points=3000, clock=clock)
    out, end = feed(short, clock, steps_per_s=1000, seconds=0.5, first=0)
    assert [s for s, _ in by_metric(out)["train_loss"]] == list(range(end))
    assert short.description == EVERY_STEP


def test_two_windows_handed_over_at_once_do_not_read_as_a_burst_of_speed() -> None:
    # An epoch's last steps come a moment after the window before them: no rate from that.
    clock = Clock()
    rule = StepMetricsRule(150, clock=clock)
    step = 0
    for _ in range(20):  # 23-step epochs in 0.161 s: a 16-step window, then 7 steps 1 ms later
        clock.now += 0.16
        rule.thin(rows(step, 16))
        clock.now += 0.001
        rule.thin(rows(step + 16, 7))
        step += 23
    assert rule.window_steps == window_for_rate(23 / 0.161, 3, 3, 150) == 8
    assert set(rule.sizes_used) == {1, 8}


def test_a_window_closed_early_by_a_checkpoint_is_followed_by_where_the_next_windows_begin() -> None:
    clock = Clock()
    rule = StepMetricsRule(150, clock=clock)
    out, step = feed(rule, clock, steps_per_s=1000, seconds=2, first=0)
    n = rule.window_steps
    out += rule.thin(rows(step, 5))  # the open window has steps up to step + 4 ...
    out += rule.flush()  # ... and a checkpoint closes it there
    more, end = feed(rule, clock, steps_per_s=1000, seconds=1, first=step + 5)
    out += more + rule.flush()
    history = by_metric(out)
    assert (step + 5, float(n)) in history[WINDOW_METRIC]  # the next windows begin after the checkpoint
    assert step + 4 in dict(history["train_loss"])
    changes = [(s, int(v)) for s, v in history[WINDOW_METRIC]]
    expected, windowed = point_steps(changes, end)
    assert [s for s, _ in history["train_loss"]] == expected
    assert [s for s, _ in history["train_loss_window_max"]] == windowed


def test_a_windowed_job_s_sink_sends_every_few_seconds_not_every_second(store: MlflowClient) -> None:
    import time

    from worker.metrics_sink import WINDOWED_FLUSH_INTERVAL_S

    run_id = store.create_run(store.create_experiment(f"held-{uuid.uuid4().hex[:6]}")).info.run_id
    clock = Clock()
    sink = MlflowMetricSink(store, lambda: (run_id, {}), flush_interval_s=0.05, buffer_limit=100_000,
                            max_points_per_s=150, clock=clock)  # fmt: skip
    try:
        step = 0
        for _ in range(40):  # 1000 steps/s: windows
            clock.now += 0.032
            sink.add_rows(rows(step, 32))
            step += 32
        assert sink.rule.window_steps > 1
        sent = sink.sent
        time.sleep(0.5)  # ten flush intervals of real time, none of the job's clock
        sink.add_rows(rows(step, 32))
        time.sleep(0.3)
        assert sink.sent == sent and sink._pending  # held: a few points wait for a fuller request
        clock.now += WINDOWED_FLUSH_INTERVAL_S
        deadline = time.monotonic() + 10
        while sink.sent < sink.added and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sink.sent == sink.added > sent
    finally:
        sink.discard()
