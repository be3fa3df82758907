"""RUN/report.md: what a run did and how well, with the figures it embeds (matplotlib, RUN/figures/*.png).

Sections: resolved config, data and rejects, teacher statistics, training curves of every loss term,
discriminator score distributions for teacher positives / teacher negatives / student negatives (the paper's
Figure 6), the accuracy table, and for the four paper datasets the paper's numbers beside ours.

RUN may be a local path or a URI: every input is read and the report written through ``qcrd_ray.storage``; the
figures are drawn into a temporary folder on this node, then uploaded. :func:`rebuild_report` makes the report
again from a finished run's outputs alone (``qcrd report --out RUN``).
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

from qcrd_ray import provenance, storage
from qcrd_ray.config import Config
from qcrd_ray.methods import METHODS, method_spec
from qcrd_ray.runs import MethodLayout, RunLayout, load_run_config

log = logging.getLogger(__name__)

# Test accuracy (%) reported by QCRD (arXiv 2405.13014), T5-base / T5-small students.
PAPER_RESULTS = {
    "svamp": {"dss": (65.5, 48.0), "qcrd": (69.0, 50.5)},
    "cqa": {"dss": (63.23, 45.21), "qcrd": (63.64, 46.11)},
    "anli1": {"dss": (52.80, 42.80), "qcrd": (54.00, 44.10)},
    "esnli": {"dss": (90.09, 84.23), "qcrd": (90.26, 85.30)},
}
LOSS_TERMS = ("loss", "l_pred", "l_rationale", "l_cl", "l_pos", "l_neg", "l_d", "s_pos", "s_neg")
MAX_SCORED = 256  # rationales of each kind scored by D for the distribution plot


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(metrics: list[dict], path: Path, title: str) -> Path | None:
    terms = [t for t in LOSS_TERMS if any(isinstance(m.get(t), (int, float)) for m in metrics)]
    if not terms:
        return None
    plt = _plt()
    cols = min(4, len(terms))
    rows = -(-len(terms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(terms):]:
        ax.set_visible(False)
    for ax, term in zip(axes.flat, terms):
        points = [(m.get("step", i), m[term]) for i, m in enumerate(metrics) if isinstance(m.get(term), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_score_distributions(scores: Mapping[str, list[float]], path: Path, title: str) -> Path | None:
    if not any(scores.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, values in scores.items():
        if values:
            ax.hist(values, bins=20, range=(0, 1), alpha=0.5, label=f"{name} (n={len(values)})")
    ax.set_xlabel("discriminator score s")
    ax.set_ylabel("rationales")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def agreement_bars(histogram: Mapping) -> list[tuple[str, int]]:
    """The agreement histogram as (tick label, examples) bars (pure): numeric agreements ascending, then the
    examples where no sample gave an answer ("none") and any other key the teacher may write, as they are."""
    numeric, other = [], []
    for key, count in histogram.items():
        try:
            numeric.append((float(key), f"{float(key):.2f}", count))
        except (TypeError, ValueError):
            other.append((str(key), count))
    return [(label, count) for _, label, count in sorted(numeric)] + other


def plot_agreement(histogram: Mapping, path: Path) -> Path | None:
    bars = agreement_bars(histogram or {})
    if not bars:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.bar(range(len(bars)), [count for _, count in bars], tick_label=[label for label, _ in bars])
    ax.set_xlabel("agreement (share of samples with the majority answer)")
    ax.set_ylabel("examples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def discriminator_scores(method: MethodLayout, cfg: Config, teacher_rows: list[dict],
                         student_negatives: Iterable[dict]) -> dict:
    """Scores of the trained D for up to MAX_SCORED teacher positives, teacher negatives and student negatives."""
    import torch

    from qcrd_ray import students as student
    from qcrd_ray.qcrd.discriminator import Discriminator, encode_pairs
    from qcrd_ray.qcrd.targets import teacher_targets

    if not storage.exists(method.discriminator):
        return {}
    local = storage.download_dir(method.model) if storage.is_uri(method.model) else Path(method.model)
    model, tokenizer = student.load_pretrained(local)
    disc = Discriminator.from_student(model, cfg.discriminator)
    disc.load_state_dict(torch.load(local / "discriminator.pt", map_location="cpu", weights_only=True))
    disc.eval()
    # Score exactly the texts D judged in training: rationales with their answers appended (qcrd/targets.py).
    kinds: dict[str, list[tuple[str, str]]] = {"teacher positives": [], "teacher negatives": []}
    for row in teacher_rows:
        pos, neg = teacher_targets(row)
        kinds["teacher positives"] += [(row["input"], t) for t in pos]
        kinds["teacher negatives"] += [(row["input"], t) for t in neg]
    questions = {r["id"]: r["input"] for r in teacher_rows}
    kinds["student negatives"] = [(questions[n["id"]], n["text"]) for n in student_negatives if n["id"] in questions]
    out = {}
    with torch.no_grad():
        for name, pairs in kinds.items():
            pairs = pairs[:MAX_SCORED]
            scores: list[float] = []
            for i in range(0, len(pairs), 32):
                chunk = pairs[i:i + 32]
                enc = encode_pairs(tokenizer, [q for q, _ in chunk], [r for _, r in chunk], cfg.student.max_input_len,
                                   disc.shares_question_states, disc.family)
                scores.extend(disc.score_encoded(enc, "cpu").tolist())
            out[name] = scores
    return out


def _pct(x) -> str:
    return f"{100 * x:.2f}" if isinstance(x, (int, float)) else "-"


def accuracy_table(cfg: Config, results: Mapping[str, dict]) -> list[str]:
    paper = PAPER_RESULTS.get(cfg.data.task)
    head = "| method | predict acc % | explain acc % | n |" + (" paper T5-base % | paper T5-small % |" if paper else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for method, r in results.items():
        pred, expl = r["eval"].get("predict", {}), r["eval"].get("explain", {})
        row = f"| {method} | {_pct(pred.get('accuracy'))} | {_pct(expl.get('accuracy'))} | {pred.get('n', '-')} |"
        if paper:
            base, small = paper.get(method, ("-", "-"))
            row += f" {base} | {small} |"
        lines.append(row)
    if paper:
        lines.append("")
        lines.append(f"Paper numbers are test accuracy on the full {cfg.data.task} test split; ours are on the "
                     f"`{cfg.data.eval_split}` split with student `{cfg.student.model}`.")
    return lines


def rationale_table(results: Mapping[str, dict]) -> list[str]:
    """What each method's explain-mode rationales get right, by its task's checks (``TaskSpec.check_rationale``:
    testbed v2's operation and numbers), as a share of the questions each check applies to; [] for a task
    without checks."""
    checked = {m: r["eval"].get("explain", {}).get("rationale_checks") for m, r in results.items()}
    checked = {m: c for m, c in checked.items() if c}
    names = list(dict.fromkeys(name for c in checked.values() for name in c))
    if not names:
        return []
    lines = ["Explain-mode rationales that pass each check of the task, % (questions it applies to):", "",
             "| method | " + " | ".join(n.replace("_", " ") for n in names) + " |", "|---|" + "---|" * len(names)]
    for method, c in checked.items():
        lines.append(f"| {method} | " + " | ".join(f"{_pct(c[n]['share'])} ({c[n]['n']})" if n in c else "-"
                                                  for n in names) + " |")
    return lines


def _teacher_line(cfg: Config) -> str:
    """The teacher in words: its backend (and model) at K and T, or each source of a mix with its share of K."""
    from qcrd_ray.teacher.sources import resolve_sources

    def one(t) -> str:
        return f"`{t.backend}`{' (' + t.model + ')' if t.model else ''}"

    if not cfg.teacher.sources:
        return f"{one(cfg.teacher)}, K = {cfg.teacher.k} at T = {cfg.teacher.temperature}"
    mix = ", ".join(f"{s.name} = {one(s.cfg.teacher)} at T = {s.cfg.teacher.temperature} ({len(s.indices)} of K)"
                    for s in resolve_sources(cfg))
    return f"a mix of sources, K = {cfg.teacher.k}: {mix}"


def source_table(sources) -> list[str]:
    """The teacher summary's per-source statistics (teacher.sources) as a Markdown table; [] for one teacher."""
    if not sources:
        return []
    lines = ["Per teacher source (agreement over its answered samples; the positives credited to the source of the "
             "first sample that wrote them):", "",
             "| source | backend | samples / question | agreement with gold | agreement with majority | error rate "
             "| share of positives |", "|---|---|---|---|---|---|---|"]
    for s in sources:
        lines.append(f"| {s.get('name', '-')} | {s.get('backend', '-')} | {s.get('samples_per_question', '-')} | "
                     + " | ".join(f"{s[k]:.1%}" if isinstance(s.get(k), (int, float)) else "-"
                                  for k in ("agreement_with_gold", "agreement_with_majority", "error_rate",
                                            "positive_share")) + " |")
    return lines + [""]


def write_report(run: RunLayout | str | Path, cfg: Config, teacher_summary: Mapping,
                 results: Mapping[str, dict]) -> str:
    """Write RUN/report.md and RUN/figures/*.png (RUN a path or a URI); returns the report's location. Any
    teacher summary the teacher writes (or none of its keys) gives a report: missing statistics are "-"."""
    layout = run if isinstance(run, RunLayout) else RunLayout.at(str(run))
    with tempfile.TemporaryDirectory(prefix="qcrd-figures-", dir=storage.cache_dir()) as tmp:
        lines = _report_lines(layout, cfg, teacher_summary, results, Path(tmp))
        for figure in sorted(Path(tmp).iterdir()):
            storage.write_bytes(storage.join(layout.figures, figure.name), figure.read_bytes())
    storage.write_text(layout.report, "\n".join(lines))  # last: the figures it embeds are in place
    return layout.report


def _report_lines(layout: RunLayout, cfg: Config, teacher_summary: Mapping, results: Mapping[str, dict],
                  figures: Path) -> list[str]:
    from qcrd_ray.teacher.pipeline import iter_teacher_rows

    lines = [f"# QCRD run: {cfg.data.task}", ""]
    lines += [f"Methods: {', '.join(results)}. Student: `{cfg.student.model}`. Teacher: {_teacher_line(cfg)}.", ""]

    lines += ["## Accuracy", ""] + accuracy_table(cfg, results) + [""]
    checks = rationale_table(results)
    lines += checks + [""] if checks else []

    lines += ["## Data and rejects", ""]
    rejects = storage.read_jsonl(storage.join(layout.teacher, "rejects.jsonl"))
    lines.append(f"Examples taught: {teacher_summary.get('examples', '-')}; rejected rows: {len(rejects)}.")
    if rejects:
        reasons = Counter(str(r.get("reason", "?")).split(":")[0] for r in rejects)
        lines += ["", "| reason | rows |", "|---|---|"] + [f"| {k} | {v} |" for k, v in reasons.most_common(10)]
    lines.append("")

    lines += ["## Teacher", ""]
    scalars = {k: v for k, v in teacher_summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    lines += ["| statistic | value |", "|---|---|"]
    lines += [f"| {k} | {round(v, 4) if isinstance(v, float) else v} |" for k, v in scalars.items()]
    lines.append("")
    lines += source_table(teacher_summary.get("sources"))
    histogram = teacher_summary.get("agreement_histogram")
    agreement = plot_agreement(histogram if isinstance(histogram, Mapping) else {}, figures / "teacher-agreement.png")
    if agreement:
        lines += [f"![teacher agreement](figures/{agreement.name})", ""]

    teacher_rows = list(iter_teacher_rows(layout.teacher))
    for method, r in results.items():
        where = MethodLayout(str(r["dir"]))
        lines += [f"## Training: {method}", ""]
        machine = provenance.machines(storage.read_jsonl(where.environment))
        lines += [f"Trained on: {machine} (`train/environment.jsonl`).", ""] if machine else []
        metrics = storage.read_jsonl(where.metrics)
        curves = plot_training_curves(metrics, figures / f"{method}-training.png", f"{method}: loss terms")
        lines += [f"![{method} training curves](figures/{curves.name})" if curves else "No training metrics.", ""]
        if method_spec(method).uses_discriminator:
            try:
                negatives = storage.read_jsonl(where.negatives)
                scores = discriminator_scores(where, cfg, teacher_rows, negatives)
            except Exception as e:  # the report must not fail a finished run
                log.warning("discriminator scores skipped: %s", e)
                scores = {}
            fig = plot_score_distributions(scores, figures / f"{method}-discriminator.png",
                                           "discriminator scores (cf. paper Fig. 6)")
            if fig:
                means = ", ".join(f"{k}: mean {sum(v) / len(v):.3f}" for k, v in scores.items() if v)
                lines += ["### Discriminator scores", "", f"![discriminator scores](figures/{fig.name})", "", means, ""]

    lines += ["## Resolved config", "", "```yaml", cfg.to_yaml().rstrip(), "```", ""]
    return lines


def run_results(layout: RunLayout, cfg: Config) -> dict[str, dict]:
    """Each trained method of a run with its evaluations on ``data.eval_split`` (what :func:`write_report`
    takes), read from the run's outputs: a method counts once its exported model is complete."""
    results = {}
    for method in METHODS:
        where = layout.method(method)
        if not storage.is_complete(where.model):
            continue
        evals = {mode: storage.read_json(storage.join(where.eval(cfg.data.eval_split, mode), "metrics.json"))
                 for mode in method_spec(method).eval_modes}
        results[method] = {"dir": where.root, "eval": {m: v for m, v in evals.items() if v is not None}}
    return results


def rebuild_report(run: storage.Location) -> str:
    """The report of a finished (or partly finished) run, from its outputs alone: RUN/config.yaml, the teacher's
    summary.json and each method's model, metrics and evaluations. Returns the report's location."""
    layout = RunLayout.at(str(run))
    if not storage.is_file(layout.config):
        raise FileNotFoundError(f"{run}: not a run directory (no {layout.config}); pass the --out of a `qcrd run`")
    cfg = load_run_config(layout.config)
    teacher = storage.read_json(layout.teacher_summary)
    if teacher is None:
        raise FileNotFoundError(f"{run}: the teacher stage has not finished (no {layout.teacher_summary})")
    results = run_results(layout, cfg)
    if not results:
        raise FileNotFoundError(f"{run}: no method has a trained model yet (expected RUN/<method>/model)")
    return write_report(layout, cfg, teacher, results)
