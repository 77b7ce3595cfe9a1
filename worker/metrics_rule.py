"""How many points a job's per-step metrics cost MLflow: every step while the job is slow,
window aggregates above a rate, so that one MLflow server serves a known number of jobs
whatever their step rates.

One MLflow server process absorbs a few thousand points a second (README, "Metrics at
fleet rates"); a small model on a GPU makes thousands of steps a second, three points
each. The rule is a token bucket: a job earns `max_points_per_s` points a second and may
run ahead of that by `burst_points` (a short job, and the first minutes of any job, log
every step). Once its allowance is spent, its per-step rows are folded into windows of N
steps (N a power of two, the smallest that keeps its measured rate under the limit): each
window logs, at its last step, the mean of every metric (`lr`: its value at that step,
exact for a schedule) and the spread where it matters (`train_loss_window_min/max`,
`grad_norm_window_max`). Nothing is dropped silently: every step is in exactly one
window, the window size is logged as the metric `metrics_window_steps` where it changes
(none at all in a run that logged every step) and the run's tag `descent.metrics_rule`
says which rule was used.

The rate is measured, not predicted, so a job that slows down (a larger model after a
warm-up, a busy GPU) goes back to every step. The clock is injected: tests drive it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

Row = tuple[int, Mapping[str, float]]

# The trainer's per-step rows (trainer/recipe.py StepWindow; the packed recipe per trial).
STEP_METRICS = frozenset({"train_loss", "lr", "grad_norm"})
# Logged at a window's last step as their value there, not a mean (the schedule's lr is exact).
LAST_VALUE_METRICS = frozenset({"lr"})
# Spread kept beside the mean: a loss spike or a gradient blow-up inside a window stays visible.
SPREAD_METRICS: dict[str, tuple[str, ...]] = {"train_loss": ("min", "max"), "grad_norm": ("max",)}
WINDOW_METRIC = "metrics_window_steps"
RULE_TAG = "descent.metrics_rule"
EVERY_STEP = "every step"
DECIDE_EVERY_S = 1.0  # the rate is measured over about a second
# Never a rate from less: two windows handed over a millisecond apart (a full one, then an
# epoch's last few steps) would read as a burst of thousands of steps a second.
MIN_SPAN_S = 0.25
SLOWER_MARGIN = 0.8  # back to a smaller window only with 20 % to spare: no flapping at a boundary


def window_metric_name(key: str, stat: str) -> str:
    return f"{key}_window_{stat}"


def spread_names() -> list[str]:
    return [window_metric_name(key, stat) for key, stats in SPREAD_METRICS.items() for stat in stats]


def points_per_window(keys: int, spread: int, window_steps: int) -> int:
    return keys if window_steps == 1 else keys + spread


def window_for_rate(rows_per_s: float, keys: int, spread: int, max_points_per_s: float) -> int:
    """The smallest power-of-two window keeping rows_per_s under max_points_per_s (1: every step)."""
    n = 1
    while rows_per_s / n * points_per_window(keys, spread, n) > max_points_per_s and n < 1 << 30:
        n *= 2
    return n


def point_steps(window_changes: list[tuple[int, int]], total_steps: int) -> tuple[list[int], list[int]]:
    """Where a run's per-step metrics have points under the rule, from its `metrics_window_steps`
    history [(step where windows of a size begin, size), ...] (empty: every step), for steps
    0..total_steps-1: (every point's step, the windowed ones'). A checkpoint that closes a window
    early is followed by a point of the same size where the next windows begin."""
    bounds = [(0, 1), *sorted(window_changes)]
    steps: list[int] = []
    windowed: list[int] = []
    for i, (start, size) in enumerate(bounds):
        end = bounds[i + 1][0] - 1 if i + 1 < len(bounds) else total_steps - 1
        if end < start:
            continue
        ends = list(range(start + size - 1, end + 1, size))
        if not ends or ends[-1] != end:
            ends.append(end)  # a size's last window closes where the next size begins, or the run ends
        steps += ends
        if size > 1:
            windowed += ends
    return steps, windowed


class StepMetricsRule:
    """Turns a job's per-step rows into the rows sent: the same rows while the job is under
    `max_points_per_s` (0: always), window aggregates above it. Called from the training
    thread: memory only, a few microseconds a row."""

    def __init__(self, max_points_per_s: float, burst_points: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 decide_every_s: float = DECIDE_EVERY_S) -> None:  # fmt: skip
        self.max_points_per_s = max_points_per_s
        self.burst_points = burst_points
        self.tokens = burst_points  # points the job may still send ahead of its rate
        self._refilled_at: float | None = None
        self.clock = clock
        self.decide_every_s = decide_every_s
        self.window_steps = 1
        self.sizes_used: list[int] = []  # in the order first used
        self._span_start: float | None = None  # when the current rate measurement began
        self._span_rows = 0
        self._keys = len(STEP_METRICS)
        # The open window: rows seen, per-key sums / extremes / last values, its last step.
        self._count = 0
        self._sums: dict[str, float] = {}
        self._mins: dict[str, float] = {}
        self._maxs: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._last_step = 0
        self._realign = False  # a window was closed early: say where the next ones begin

    @property
    def description(self) -> str:
        """The value of the run's tag `descent.metrics_rule`."""
        if all(n == 1 for n in self.sizes_used):
            return EVERY_STEP
        spread = ", ".join(spread_names())
        sizes = ", ".join(str(n) for n in sorted(set(self.sizes_used)))
        return (
            f"mean of N-step windows above {self.max_points_per_s:g} points/s (once {self.burst_points:.0f} points "
            f"ahead of that rate), every step below: each window "
            f"logs at its last step the mean of its steps' values (lr: its value at that step) and {spread}; "
            f"N a power of two; window sizes used: {sizes} (where each began: metric {WINDOW_METRIC})"
        )

    def thin(self, rows: list[Row]) -> list[Row]:
        """The rows to send for these per-step rows (oldest first)."""
        if not rows:
            return rows
        out: list[Row] = []
        now = self.clock()
        if self._span_start is None:  # the first rows: the rate is measured from here
            self._span_start = self._refilled_at = now
            self._keys = len(rows[0][1])
            self.sizes_used.append(1)  # (no point for it: a run without the metric logged every step)
        else:
            self.tokens = min(self.burst_points, self.tokens + (now - self._refilled_at) * self.max_points_per_s)
            self._refilled_at = now
            self._span_rows += len(rows)
            self._decide(now, rows[0][0], out)
        if self._realign:
            self._realign = False
            if self.window_steps > 1:
                out.append((rows[0][0], {WINDOW_METRIC: float(self.window_steps)}))
        if self.window_steps == 1 and not self._count:
            out.extend(rows)  # (the usual, slow job: the rows as they are)
            self.tokens -= len(rows) * self._keys
            return out
        for step, metrics in rows:
            self._fold(step, metrics)
            if self._count >= self.window_steps:
                out.append(self._close_window())
                self.tokens -= len(out[-1][1])
        return out

    def flush(self) -> list[Row]:
        """The open window, closed at its last step so far (a checkpoint, the end of the run);
        the next windows begin at the next step, and a `metrics_window_steps` point there says so."""
        if not self._count:
            return []
        self._realign = True
        return [self._close_window()]

    def _decide(self, now: float, first_step: int, out: list[Row]) -> None:
        elapsed = now - self._span_start
        if elapsed <= 0 or self.max_points_per_s <= 0:
            return
        n = self.window_steps
        # Every second; at once when a job logging every step has spent its allowance.
        if elapsed < self.decide_every_s and not (n == 1 and self.tokens <= 0 and elapsed >= MIN_SPAN_S):
            return
        rate = self._span_rows / elapsed
        self._span_start, self._span_rows = now, 0
        spread = len(spread_names())
        wanted = window_for_rate(rate, self._keys, spread, self.max_points_per_s)
        if n == 1 and self.tokens > 0:
            wanted = 1  # still within its allowance: every step
        elif wanted < n and window_for_rate(rate / SLOWER_MARGIN, self._keys, spread, self.max_points_per_s) >= n:
            wanted = n  # only a little under the boundary: stay
        if wanted == n:
            return
        if self._count:
            out.append(self._close_window())  # the old size's last window ends where the new size begins
        self.window_steps = wanted
        self.sizes_used.append(wanted)
        self._realign = False  # (the change's own point says where the new windows begin)
        out.append((first_step, {WINDOW_METRIC: float(wanted)}))

    def _fold(self, step: int, metrics: Mapping[str, float]) -> None:
        sums, mins, maxs = self._sums, self._mins, self._maxs
        for key, value in metrics.items():
            if key in LAST_VALUE_METRICS:
                self._last[key] = value
                continue
            if key in sums:
                sums[key] += value
                if key in SPREAD_METRICS:
                    if value < mins[key]:
                        mins[key] = value
                    if value > maxs[key]:
                        maxs[key] = value
            else:
                sums[key] = value
                if key in SPREAD_METRICS:
                    mins[key] = maxs[key] = value
        self._count += 1
        self._last_step = step

    def _close_window(self) -> Row:
        count = self._count
        metrics = {key: total / count for key, total in self._sums.items()} | self._last
        for key, stats in SPREAD_METRICS.items():
            if key in self._mins:
                if "min" in stats:
                    metrics[window_metric_name(key, "min")] = self._mins[key]
                if "max" in stats:
                    metrics[window_metric_name(key, "max")] = self._maxs[key]
        self._count = 0
        self._sums, self._mins, self._maxs, self._last = {}, {}, {}, {}
        return self._last_step, metrics
