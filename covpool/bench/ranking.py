"""When the timings of a comparison may be ranked, and the ranks they allow.

A comparison is a set of configurations timed against each other with interleaved repeats (one panel of
the figures: one function, device, dtype, ``n`` and batch; or one layer on one device and dtype). Each
configuration has a :class:`~covpool.bench.timing.Spread` (min, median, max) of its forward and of its
forward+backward times. The rule:

1. **Too wide to rank.** If one configuration's forward or forward+backward spread ``max / min`` exceeds
   :data:`MAX_SPREAD` (1.5), or its forward alone was slower in every run than its forward+backward in
   any run (impossible without outside load), or two configurations that run the same computation
   (``auto`` and the method it resolves to) have medians further apart than that factor, the
   comparison is *not rankable*: no ranks are given, and
   the table and figures say so. The machine was too busy, or the runs too short, for these numbers to
   order the configurations; rerun on an idle machine or with more ``--repeats``.
2. **Ranks from non-overlapping spreads.** Otherwise a configuration's rank is 1 plus the number of
   configurations whose slowest forward+backward run was faster than its fastest one. Configurations
   whose ranges overlap are not ordered against each other, so they can share a rank (``1, 1, 3``).

Only the forward+backward time is ranked (it is what the figures plot); the forward time enters the rule
through its spread and the consistency check.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from covpool.bench.timing import Measurement, Spread

Key = TypeVar("Key", bound=Hashable)

MAX_SPREAD = 1.5
"""Largest ``max / min`` of one configuration's timed runs for its comparison to be ranked."""

VERDICT_FIELDS = ("rankable", "reason", "widest_spread", "missing", "same")
"""Fields of :func:`rank_rows`'s verdict after the comparison's own keys."""


@dataclass(frozen=True)
class Ranking:
    """The verdict on one comparison: ``ranks`` by configuration, or ``reason`` why there are none."""

    ranks: dict = field(default_factory=dict)
    reason: str = ""
    widest: float = math.nan
    """Largest spread ``max / min`` among the configurations (NaN when none was timed)."""

    @property
    def rankable(self) -> bool:
        """Whether ranks were given."""
        return not self.reason


def rank(
    times: Mapping[Key, tuple[Spread, Spread]],
    *,
    max_spread: float = MAX_SPREAD,
    same: Mapping[Key, Key] | None = None,
) -> Ranking:
    """Rank configurations by forward+backward time; ``times[key] = (forward, forward_backward)``.

    ``same[a] = b`` says that ``a`` runs the same computation as ``b`` (``auto`` resolving to ``eigh``).

    Example:
        >>> fast, slow, noisy = Spread(1.0, 1.1, 1.2), Spread(2.0, 2.1, 2.2), Spread(1.0, 1.5, 2.0)
        >>> rank({"a": (fast, fast), "b": (fast, slow), "c": (fast, fast)}).ranks
        {'a': 1, 'b': 3, 'c': 1}
        >>> rank({"a": (fast, fast), "b": (fast, noisy)}).reason
        'spread above 1.5x: b 2.00x'
    """
    ratios = [spread.ratio for pair in times.values() for spread in pair if not math.isnan(spread.ratio)]
    widest = max(ratios, default=math.nan)
    problems = []
    wide = {
        key: max(pair[0].ratio, pair[1].ratio)
        for key, pair in times.items()
        if max(pair[0].ratio, pair[1].ratio) > max_spread
    }
    if wide:
        listed = ", ".join(f"{key} {ratio:.2f}x" for key, ratio in wide.items())
        problems.append(f"spread above {max_spread:g}x: {listed}")
    for key, (forward, forward_backward) in times.items():
        if forward.min > forward_backward.max:
            problems.append(
                f"{key}: forward ({forward.min:.3g} ms at best) slower than forward+backward "
                f"({forward_backward.max:.3g} ms at worst)"
            )
    for key, twin in (same or {}).items():
        ratio = times[key][1].median / times[twin][1].median
        if max(ratio, 1.0 / ratio) > max_spread:
            problems.append(f"{key} runs {twin} but took {ratio:.2f}x its forward+backward time")
    if problems:
        return Ranking(reason="; ".join(problems), widest=widest)
    timed = {key: pair[1] for key, pair in times.items() if not math.isnan(pair[1].min)}
    ranks = {
        key: 1 + sum(other.max < spread.min for other in timed.values()) for key, spread in timed.items()
    }
    return Ranking(ranks=ranks, widest=widest)


ROW_TIMES = (
    "forward_ms",
    "forward_min_ms",
    "forward_max_ms",
    "forward_backward_ms",
    "forward_backward_min_ms",
    "forward_backward_max_ms",
)
"""Time fields of a row: the median, then the fastest and slowest run, of the forward and the
forward+backward."""


def time_fields(measurement: Measurement) -> dict:
    """The :data:`ROW_TIMES` fields of a row from ``measurement``."""
    values = {}
    for prefix in ("forward", "forward_backward"):
        spread = getattr(measurement, prefix)
        values |= {
            f"{prefix}_ms": spread.median,
            f"{prefix}_min_ms": spread.min,
            f"{prefix}_max_ms": spread.max,
        }
    return values


def row_spreads(row: dict) -> tuple[Spread, Spread]:
    """``(forward, forward_backward)`` spreads of a row (NaN where it was not timed)."""
    return tuple(
        Spread(row[f"{prefix}_min_ms"], row[f"{prefix}_ms"], row[f"{prefix}_max_ms"])
        for prefix in ("forward", "forward_backward")
    )


def rank_rows(
    rows: Sequence[dict],
    keys: Sequence[str],
    *,
    name: str = "config",
    same: Mapping[str, str] | None = None,
    max_spread: float = MAX_SPREAD,
) -> dict:
    """Rank the timed ``rows`` of one comparison in place (their ``rank``, ``spread``); returns the
    verdict: the comparison's ``keys`` and :data:`VERDICT_FIELDS`.

    ``rows[i][name]`` names the configuration; ``same[a] = b`` says that ``a`` runs the same computation
    as ``b`` (``auto`` resolving to ``eigh``), which is checked where both were timed.
    """
    timed = {row[name]: row_spreads(row) for row in rows if not math.isnan(row["forward_ms"])}
    twins = {a: b for a, b in (same or {}).items() if a in timed and b in timed}
    verdict = rank(timed, max_spread=max_spread, same=twins)
    for row in rows:
        forward, forward_backward = row_spreads(row)
        row["spread"] = max(forward.ratio, forward_backward.ratio)
        row["rank"] = verdict.ranks.get(row[name])
    return {
        **{key: rows[0][key] for key in keys},
        "rankable": verdict.rankable and bool(timed),
        "reason": verdict.reason or ("" if timed else "nothing timed"),
        "widest_spread": verdict.widest,
        "missing": [row[name] for row in rows if math.isnan(row["forward_ms"])],
        "same": twins,
    }
