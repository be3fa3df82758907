"""The sweep's statistics, pure: means, paired differences with 95 % t intervals, the pairs (seeds) a given
interval width needs, and the per-cell tables summary.md and the plots are made of (docs/design.md, "Sweeps")."""

from __future__ import annotations

import math


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half width of its 95 % t interval (0 for a single value)."""
    from scipy import stats

    mean, sd = mean_sd(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))


def paired_difference(method: dict, baseline: dict) -> dict:
    """``method − baseline`` over the pairing values (seeds) both have: mean and a 95 % t interval (None with
    fewer than 2 pairs)."""
    keys = sorted(set(method) & set(baseline), key=str)
    diffs = [method[k] - baseline[k] for k in keys]
    if not diffs:
        return {"n": 0, "mean": None, "lo": None, "hi": None, "sd": None}
    mean, sd = mean_sd(diffs)
    if len(diffs) < 2:
        return {"n": 1, "mean": mean, "lo": None, "hi": None, "sd": None}
    _, half = mean_interval(diffs)
    return {"n": len(diffs), "mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd}


def pairs_for_half_width(sd: float, half_width: float, most: int = 10_000) -> int | None:
    """The fewest pairs (seeds) whose 95 % t interval of a paired difference with this ``sd`` is at most
    ± ``half_width`` wide: how many seeds a comparison needs to resolve an effect of that size. None: more than
    ``most``."""
    from scipy import stats

    if sd == 0:
        return 2
    for n in range(2, most + 1):
        if stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= half_width:
            return n
    return None


def cell_table(rows: list[dict], grid_keys: list[str], pair_by: str, baseline: str, column: str,
               compare_on: str = "train.method") -> list[dict]:
    """One line per cell (the grid keys other than ``pair_by``): n, mean ± sd of ``column`` and the paired
    difference to the cell with ``compare_on = baseline`` and the same other keys."""
    cell_keys = [k for k in grid_keys if k != pair_by]
    cells: dict[tuple, dict] = {}
    machines: dict[tuple, dict] = {}  # each trial's machine, by cell and pairing value
    for row in rows:
        if row.get(column) is None:
            continue
        cell = tuple(row[k] for k in cell_keys)
        cells.setdefault(cell, {})[row.get(pair_by)] = row[column]
        machines.setdefault(cell, {})[row.get(pair_by)] = row.get("machine")
    out = []
    for cell, by_pair in cells.items():
        mean, sd = mean_sd(list(by_pair.values()))
        line = {**dict(zip(cell_keys, cell)), "n": len(by_pair), "mean": mean, "sd": sd}
        if compare_on in cell_keys:
            base_cell = tuple(baseline if k == compare_on else v for k, v in zip(cell_keys, cell))
            if base_cell != cell and base_cell in cells:
                line["diff"] = {**paired_difference(by_pair, cells[base_cell]),
                                "across_machines": across_machines(machines[cell], machines[base_cell])}
        out.append(line)
    return out


def across_machines(method: dict, baseline: dict) -> int:
    """How many pairs (pairing values both have) trained their two trials on unlike recorded machines: there the
    same seed is another draw, so the pair's difference mixes the method with the machine."""
    return sum(1 for k in set(method) & set(baseline) if method[k] and baseline[k] and method[k] != baseline[k])


POOLED = "pooled"


def pooled_rows(rows: list[dict], over: str, pair_by: str) -> list[dict]:
    """``rows`` once more with ``over`` (e.g. teacher.noise) set to "pooled" and each pairing value made
    ``<level>/<seed>``, so :func:`cell_table` pairs every method with the baseline across all levels at once (one
    pair per level and seed): the pooled analysis of an effect the single levels are too few seeds to show.
    Empty when the rows do not span two levels of ``over``."""
    if len({r.get(over) for r in rows}) < 2:
        return []
    return [{**r, over: POOLED, pair_by: f"{r.get(over)}/{r.get(pair_by)}"} for r in rows]


def difference_series(rows: list[dict], grid_keys: list[str], pair_by: str, baseline: str, column: str,
                      compare_on: str, x: str) -> dict[str, list[dict]]:
    """Per value of ``compare_on`` other than ``baseline``: its paired difference to the baseline at each level of
    ``x`` (``{x, mean, lo, hi, n}``, levels in row order), what differences.png draws. Cells that differ in other
    keys than ``x`` are kept apart (their label joins those values)."""
    series: dict[str, list[dict]] = {}
    for line in cell_table(rows, grid_keys, pair_by, baseline, column, compare_on):
        d = line.get("diff")
        if not d or d["mean"] is None:
            continue
        label = ", ".join(str(line[k]) for k in grid_keys if k not in (pair_by, x))
        series.setdefault(label, []).append({"x": line.get(x), "mean": d["mean"], "lo": d["lo"], "hi": d["hi"],
                                             "n": d["n"]})
    return series
