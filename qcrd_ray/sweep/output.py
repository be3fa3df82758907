"""What a sweep writes from its finished trials' rows: results.csv / results.md (one row per trial), summary.md
(per cell: mean ± sd and the paired difference to the baseline by seed with a 95 % t interval, pooled over the
plotted key's levels too; with a ``decision``, the rule's verdict on each score), best.yaml (the best cell on
valid), accuracy.png and differences.png (each method's paired difference to the baseline against the plotted
key: with a clean-DSS arm, the headroom H = clean-DSS − DSS next to QCRD − DSS). docs/design.md, "Sweeps" and
"Summaries pool noise levels and plot differences"."""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import yaml

from qcrd_ray.sweep.decision import decide
from qcrd_ray.sweep.spec import METRICS, SPLITS, SweepSpec, axes, rationale_columns, row_keys, trial_config
from qcrd_ray.sweep.stats import cell_table, difference_series, mean_interval, pairs_for_half_width, pooled_rows

# the smallest difference a summary says how many seeds it would take to resolve: the paper's gains over DSS are
# 0.2-3.5 points, and the quality study's target is +2
RESOLVE = 0.02


def percent(v) -> str:
    """An accuracy fraction as a percentage with one decimal; missing → "-"."""
    return "-" if v is None else f"{100 * v:.1f}"


def write_csv(path: str, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in columns} for r in rows)


def checked_columns(rows: list[dict]) -> list[str]:
    """The rationale-check columns (``spec.rationale_columns``) that some row has a value in, in row order."""
    return [c for c in rationale_columns() if any(r.get(c) is not None for r in rows)]


def write_outputs(spec: SweepSpec, out: str, rows: list[dict]) -> None:
    """results.csv/.md, summary.md, best.yaml, accuracy.png and differences.png from the finished trials' rows."""
    rows = sorted(rows, key=lambda r: r["trial"])
    checks = checked_columns(rows)
    unchecked = rationale_columns().keys() - set(checks)  # a task without rationale checks gets no empty columns
    columns = [c for c in row_keys(spec) if c not in unchecked]
    write_csv(os.path.join(out, "results.csv"), columns, rows)
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(percent(r.get(c)) if c.endswith(METRICS) or c == "teacher_accuracy" or c in checks
                             else "-" if r.get(c) is None else str(r.get(c)) for c in columns) + " |" for r in rows]
    Path(out, "results.md").write_text("\n".join(md) + "\n")

    keys = axes(spec)
    summary = [f"# Sweep {spec.name}: {len(rows)} trials\n", summary_legend(spec), *machines_note(rows)]
    for split in SPLITS:
        for mode in METRICS:
            summary += summary_table(spec, rows, f"{split}_{mode}", f"{split} {mode}")
    summary += rationale_tables(spec, rows)
    if spec.decision:  # the rule read on every score; the one it was registered for is --rescore-valid's
        summary += [f"\nThe sweep file's decision rule, applied below to each score; its primary score is valid "
                    f"{spec.metric} on fresh problems (`--rescore-valid N`, rescored-valid-N.md)."]
        for split in SPLITS:
            for mode in METRICS:
                summary += verdict_section(spec, rows, f"{split}_{mode}", f"{split} {mode}")
    Path(out, "summary.md").write_text("\n".join(summary) + "\n")

    valid = cell_table(rows, keys, spec.pair_by, spec.baseline, f"valid_{spec.metric}", spec.compare_on)
    if valid:
        best = max(valid, key=lambda line: line["mean"])
        cell = {k: best[k] for k in keys if k != spec.pair_by}
        Path(out, "best.yaml").write_text(yaml.safe_dump(
            {"chosen_on": f"valid {spec.metric} accuracy", "valid_mean": best["mean"], "cell": cell,
             "config": trial_config(spec, cell).to_dict()}, sort_keys=False))
    plot_accuracy(spec, rows, os.path.join(out, "accuracy.png"))
    plot_differences(spec, rows, f"test_{spec.metric}", f"test {spec.metric}", os.path.join(out, "differences.png"))


def format_difference(d: dict | None) -> str:
    """A paired difference in points: ``+2.1 [-0.4, +4.6] (n=8)``, ``(n=8, 1 across machines)`` when some pairs
    trained on unlike machines; "-" when there is none."""
    if not d or d.get("mean") is None:
        return "-"
    interval = f" [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]" if d["lo"] is not None else ""
    across = f", {d['across_machines']} across machines" if d.get("across_machines") else ""
    return f"{100 * d['mean']:+.1f}{interval} (n={d['n']}{across})"


def _trials(n: int) -> str:
    return f"{n} trial" + ("" if n == 1 else "s")


def machines_note(rows: list[dict]) -> list[str]:
    """summary.md's warning when the trials trained on unlike machines (``machine``: ``provenance.machines``):
    there a seed is another draw, so the pairs by seed are not the same student twice. Trials that recorded no
    machine (trained before it was recorded) are counted apart."""
    kinds = Counter(r.get("machine") for r in rows if r.get("machine"))
    if len(kinds) < 2:
        return []
    unknown = sum(1 for r in rows if not r.get("machine"))
    lines = [f"**The trials trained on {len(kinds)} unlike machines** (results.csv, `machine`): the same seed gives "
             f"another student on each, so a paired difference mixes the method with the machine; each Δ says how "
             f"many of its pairs do (\"across machines\"). Rerun those trials on one kind of machine to compare "
             f"arms.\n"]
    lines += [f"- {_trials(n)}: {kind}" for kind, n in kinds.most_common()]
    lines += [f"- {_trials(unknown)}: not recorded"] if unknown else []
    return lines + [""]


def summary_legend(spec: SweepSpec) -> str:
    return (f"Accuracy (%) per cell, mean ± sd over `{spec.pair_by}`; Δ = paired difference to "
            f"`{spec.compare_on} = {spec.baseline}` (by `{spec.pair_by}`) with its 95 % t interval and the sd of "
            f"the differences; \"pairs for ±{100 * RESOLVE:g}\" = the {spec.pair_by} values a 95 % interval that "
            f"narrow would need at that sd.\n")


def levels_and_pooled(spec: SweepSpec, rows: list[dict], column: str) -> list[dict]:
    """``stats.cell_table`` of ``column`` per cell, then pooled over ``plot_x``'s levels when it is a grid key."""
    pooled = pooled_rows(rows, spec.plot_x, spec.pair_by) if spec.plot_x in spec.grid else []
    return cell_table(rows + pooled, axes(spec), spec.pair_by, spec.baseline, column, spec.compare_on)


def summary_table(spec: SweepSpec, rows: list[dict], column: str, title: str) -> list[str]:
    """summary.md's section for one accuracy ``column`` (markdown lines; none when no row has it)."""
    keys = axes(spec)
    table = levels_and_pooled(spec, rows, column)
    if not table:
        return []
    cell_keys = [k for k in keys if k != spec.pair_by]
    lines = [f"\n## {title}\n", "| " + " | ".join(cell_keys) + f" | n | mean ± sd | Δ vs {spec.baseline} "
             f"[95 % CI] | sd of Δ | pairs for ±{100 * RESOLVE:g} |", "|" + "---|" * (len(cell_keys) + 5)]
    for line in table:
        d = line.get("diff")
        delta = format_difference(d)
        spread = "- | -"
        if d and d.get("sd") is not None:
            need = pairs_for_half_width(d["sd"], RESOLVE)
            spread = f"{100 * d['sd']:.1f} | {need if need else '> 10000'}"
        lines.append("| " + " | ".join(str(line[k]) for k in cell_keys) +
                     f" | {line['n']} | {100 * line['mean']:.1f} ± {100 * line['sd']:.1f} | {delta} | {spread} |")
    return lines


def rationale_tables(spec: SweepSpec, rows: list[dict]) -> list[str]:
    """summary.md's sections for the rationale checks (the share of explain-mode rationales that pass each check
    of the task, e.g. testbed v2's ``trap_operation``), the same tables as accuracy's; none without checks."""
    lines, every = [], rationale_columns()
    for column in checked_columns(rows):
        split, check = every[column]
        lines += summary_table(spec, rows, column, f"{split} rationales: {check.replace('_', ' ')} (% of those it "
                                                   f"applies to)")
    return lines


def verdict_section(spec: SweepSpec, rows: list[dict], column: str, title: str) -> list[str]:
    """The sweep's pre-registered ``decision`` applied to ``column`` (markdown lines; none without a decision):
    per level and pooled, H = control − baseline, each judged method's Δ, and the rule's verdict with its reason."""
    if not spec.decision:
        return []
    keys = axes(spec)
    table = levels_and_pooled(spec, rows, column)
    control, min_effect = spec.decision["control"], spec.decision.get("min_effect", RESOLVE)
    verdicts = decide(table, spec.compare_on, control, spec.decision["methods"], min_effect)
    if not verdicts:
        return []
    group_keys = [k for k in keys if k not in (spec.compare_on, spec.pair_by)]
    lines = [f"\n## Verdict on {title}: the pre-registered rule\n",
             f"H = `{control}` − `{spec.baseline}`, Δ = method − `{spec.baseline}`, paired by `{spec.pair_by}`, "
             f"95 % t intervals, in points; the rule and its threshold (+{100 * min_effect:g}) are in the sweep "
             f"file's `decision` and `qcrd_ray/sweep/decision.py`.\n",
             "| " + " | ".join(group_keys + ["method", "H", "Δ", "verdict", "why"]) + " |",
             "|" + "---|" * (len(group_keys) + 5)]
    for v in verdicts:
        cells = [str(v.group.get(k)) for k in group_keys]
        cells += [str(v.method), format_difference(v.headroom), format_difference(v.effect), f"**{v.verdict}**", v.why]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def method_colors(spec: SweepSpec, rows: list[dict]) -> dict:
    """One colour per method for every plot of a sweep (whichever methods a plot leaves out, e.g. the baseline)."""
    methods = sorted({str(r.get(spec.compare_on, "?")) for r in rows})
    return {m: f"C{i}" for i, m in enumerate(methods)}


def plot_accuracy(spec: SweepSpec, rows: list[dict], path: str,
                  columns: tuple[str, ...] = ("test_predict", "test_explain"), ylabel: str = "test accuracy (%)") -> None:
    """Accuracy against ``plot_x``, one line per method and column (the first solid, the next dashed), each point
    the mean over seeds with its 95 % t interval."""
    if spec.plot_x not in spec.grid or not rows:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    line_key = spec.compare_on
    colors = method_colors(spec, rows)
    for method, color in colors.items():  # method: the compare_on value as text
        for column, style in zip(columns, ("-", "--", ":")):
            xs, means, halves = [], [], []
            for x in spec.grid[spec.plot_x]:
                vals = [r[column] for r in rows if r.get(spec.plot_x) == x
                        and str(r.get(line_key, "?")) == method and r.get(column) is not None]
                if vals:
                    mean, half = mean_interval(vals)
                    xs.append(x), means.append(100 * mean), halves.append(100 * half)
            if xs:
                label = method if len(columns) == 1 else f"{method} ({column.rsplit('_', 1)[-1]})"
                ax.errorbar(xs, means, yerr=halves, fmt=style + "o", color=color, capsize=3, label=label)
    ax.set_xlabel(spec.plot_x)
    ax.set_ylabel(f"{ylabel}, mean and 95 % CI")
    ax.set_title(f"sweep {spec.name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_differences(spec: SweepSpec, rows: list[dict], column: str, title: str, path: str) -> None:
    """Each method's paired difference to the baseline (points, 95 % t intervals) against ``plot_x``, side by
    side at each level: with a clean-DSS arm, H = clean-DSS − DSS next to QCRD − DSS."""
    if spec.plot_x not in spec.grid or not rows:
        return
    series = difference_series(rows, axes(spec), spec.pair_by, spec.baseline, column, spec.compare_on, spec.plot_x)
    if not series:
        return
    plt = _plt()
    levels = list(spec.grid[spec.plot_x])
    fig, ax = plt.subplots(figsize=(6, 4))
    width, colors = 0.8 / len(series), method_colors(spec, rows)
    for i, (label, points) in enumerate(sorted(series.items())):
        xs = [levels.index(p["x"]) - 0.4 + width * (i + 0.5) for p in points]
        means = [100 * p["mean"] for p in points]
        errs = [[100 * (p["mean"] - p["lo"]) if p["lo"] is not None else 0 for p in points],
                [100 * (p["hi"] - p["mean"]) if p["hi"] is not None else 0 for p in points]]
        ax.errorbar(xs, means, yerr=errs, fmt="o", capsize=3,  # a label that joins other keys: a colour of its own
                    color=colors.get(label, f"C{(len(colors) + i) % 10}"),
                    label=f"{label} − {spec.baseline}")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(levels)), [str(v) for v in levels])
    ax.set_xlabel(spec.plot_x)
    ax.set_ylabel(f"Δ vs {spec.baseline}, points (95 % CI)")
    ax.set_title(f"sweep {spec.name}: {title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
