"""Charts drawn on the server as inline SVG: no script, no external library.

The overview's throughput chart is one bar per minute (jobs that finished in that
minute), the failed part of each bar stacked on top in another colour. This module only
computes the geometry; the template draws it, with the colours in the stylesheet.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

WIDTH = 720
HEIGHT = 160
_TOP = 10  # room above the tallest bar
_BOTTOM = 20  # room for the time labels


@dataclasses.dataclass(frozen=True)
class Bar:
    """One minute: where its two stacked rectangles go, and what its tooltip says."""

    x: float
    width: float
    ok_y: float
    ok_height: float
    failed_y: float
    failed_height: float
    title: str


@dataclasses.dataclass(frozen=True)
class Chart:
    """A bar chart's geometry."""

    width: int
    height: int
    baseline: float
    bars: list[Bar]
    peak: int
    labels: list[tuple[float, str]]  # x, text under the axis
    total: int
    failed: int


def throughput(
    per_minute: Sequence[tuple[dt.datetime, int, int]],
    now: dt.datetime,
    minutes: int = 60,
) -> Chart:
    """Bars for the last ``minutes`` minutes up to ``now`` from (minute, finished,
    failed) triples; minutes with nothing finished are empty bars."""
    end = now.replace(second=0, microsecond=0)
    start = end - dt.timedelta(minutes=minutes - 1)
    counts = {minute: (done, failed) for minute, done, failed in per_minute}
    peak = max([done for minute, done, _ in per_minute if minute >= start] or [0])
    slot = WIDTH / minutes
    usable = HEIGHT - _TOP - _BOTTOM
    baseline = float(HEIGHT - _BOTTOM)
    bars: list[Bar] = []
    labels: list[tuple[float, str]] = []
    total = failed_total = 0
    for i in range(minutes):
        minute = start + dt.timedelta(minutes=i)
        done, failed = counts.get(minute, (0, 0))
        total += done
        failed_total += failed
        ok = done - failed
        scale = usable / peak if peak else 0.0
        ok_height = ok * scale
        failed_height = failed * scale
        x = i * slot
        bars.append(
            Bar(
                x=round(x + 1, 2),
                width=round(max(slot - 2, 1), 2),
                ok_y=round(baseline - ok_height, 2),
                ok_height=round(ok_height, 2),
                failed_y=round(baseline - ok_height - failed_height, 2),
                failed_height=round(failed_height, 2),
                title=f"{minute:%H:%M} UTC: {done} finished, {failed} failed",
            )
        )
        if i % 10 == 0:
            labels.append((round(x, 2), f"{minute:%H:%M}"))
    return Chart(WIDTH, HEIGHT, baseline, bars, peak, labels, total, failed_total)


__all__ = ["Bar", "Chart", "throughput"]
