"""The pre-registered decision rule, pure (docs/quality.md, "What is scored and the decision rule"): a sweep file's
``decision`` names the headroom control and the methods it judges, and every verdict follows from the paired
differences to the baseline, so no one chooses the reading after seeing the numbers.

1. H = control − baseline. If H's upper 95 % bound is below ``min_effect``, the testbed cannot show the mechanism
   at that level ("no headroom"); the methods are not judged there.
2. If H ≥ ``min_effect`` with its interval above 0, a method succeeds when its Δ = method − baseline is
   ≥ ``min_effect`` with its interval above 0 and recovers at least half of H (mean Δ ≥ mean H / 2); otherwise it
   fails.
3. An interval that spans 0 (H's, when rule 1 does not apply, or the method's) is "inconclusive", with the pairs
   (seeds) a ± ``min_effect`` interval would need at the measured spread — never "no effect".
"""

from __future__ import annotations

from dataclasses import dataclass

from qcrd_ray.sweep.stats import pairs_for_half_width

NO_HEADROOM, SUCCEEDS, FAILS, INCONCLUSIVE = "no headroom", "succeeds", "fails", "inconclusive"


@dataclass(frozen=True)
class Verdict:
    group: dict  # the cell's keys other than the method and the pairing key (e.g. {"teacher.noise": 0.3})
    method: str
    headroom: dict  # stats.paired_difference: control − baseline
    effect: dict  # stats.paired_difference: method − baseline
    verdict: str
    why: str


def _points(v: float) -> str:
    return f"{100 * v:+.1f}"


def _seeds_needed(d: dict, min_effect: float) -> str:
    need = pairs_for_half_width(d["sd"], min_effect)
    return f"a ±{100 * min_effect:g} interval needs {need if need else '> 10000'} pairs at this spread (sd " \
           f"{100 * d['sd']:.1f})"


def _unresolved(d: dict | None) -> bool:
    return d is None or d.get("lo") is None


def judge(headroom: dict | None, effect: dict | None, min_effect: float) -> tuple[str, str]:
    """The rule's verdict on one method at one level, and why, from the two paired differences to the baseline
    (``stats.paired_difference``: mean, lo, hi, sd, n; fractions, not points)."""
    point = f"+{100 * min_effect:g}"
    if _unresolved(headroom):
        return INCONCLUSIVE, "H has fewer than 2 pairs"
    if headroom["hi"] < min_effect:
        return NO_HEADROOM, f"H's upper bound {_points(headroom['hi'])} is below {point}: the testbed cannot show " \
                            f"the mechanism here"
    if headroom["lo"] <= 0:
        return INCONCLUSIVE, f"H's interval spans 0; {_seeds_needed(headroom, min_effect)}"
    if headroom["mean"] < min_effect:
        return INCONCLUSIVE, f"H is above 0 but its mean is below {point}; {_seeds_needed(headroom, min_effect)}"
    if _unresolved(effect):
        return INCONCLUSIVE, "Δ has fewer than 2 pairs"
    if effect["lo"] <= 0 <= effect["hi"]:
        return INCONCLUSIVE, f"Δ's interval spans 0; {_seeds_needed(effect, min_effect)}"
    short = []
    if effect["mean"] < min_effect or effect["lo"] <= 0:
        short.append(f"Δ is not ≥ {point} with its interval above 0")
    if effect["mean"] < headroom["mean"] / 2:
        short.append(f"it recovers {effect['mean'] / headroom['mean']:.0%} of H, under half")
    if short:
        return FAILS, "; ".join(short)
    return SUCCEEDS, f"Δ ≥ {point} above 0 and it recovers {effect['mean'] / headroom['mean']:.0%} of H"


def decide(table: list[dict], compare_on: str, control: str, methods: list[str], min_effect: float) -> list[Verdict]:
    """One verdict per judged method and group of ``stats.cell_table`` lines (the lines that differ only in
    ``compare_on``: a noise level, or "pooled"), in table order. ``control`` is the headroom arm."""
    groups: dict[tuple, dict[str, dict]] = {}
    for line in table:
        group = tuple((k, v) for k, v in line.items() if k not in (compare_on, "n", "mean", "sd", "diff"))
        groups.setdefault(group, {})[line[compare_on]] = line.get("diff")
    verdicts = []
    for group, diffs in groups.items():
        for method in methods:
            if method in diffs:
                verdict, why = judge(diffs.get(control), diffs[method], min_effect)
                verdicts.append(Verdict(dict(group), method, diffs.get(control), diffs[method], verdict, why))
    return verdicts
