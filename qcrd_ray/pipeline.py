"""`qcrd run`: teach → train (one or more methods) → evaluate → report, in one run directory (layout:
`qcrd_ray.runs`).

Every stage writes its outputs under RUN and is skipped when they are already complete, so rerunning the same
command after an interruption continues where it stopped (the teacher resumes by shard, training from its last
round checkpoint). What cannot work is refused before anything starts (a teacher backend that cannot serve the
task), and a teacher output not worth training on stops the run before training (`teacher_problem`). RUN may be a
local path or a URI (``s3://bucket/run``): every stage reads and writes it through ``qcrd_ray.storage``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from qcrd_ray import storage
from qcrd_ray.config import Config, ConfigError
from qcrd_ray.methods import method_spec
from qcrd_ray.runs import RunLayout, check_same_config

log = logging.getLogger(__name__)

# A teacher output with more failed samples than this share (request errors, outputs without an answer) is not
# worth training on: the student would learn from the few that worked, and accuracy would say nothing.
MAX_FAILED_SAMPLE_SHARE = 0.5


class StageError(RuntimeError):
    """A stage of `qcrd run` failed; ``stage`` names it (``teach``, ``train qcrd``, ``eval dss explain``, …)."""

    def __init__(self, stage: str, message: str):
        # both in args: Ray and Tune copy and pickle exceptions by calling the class with its args
        super().__init__(stage, message)
        self.stage, self.message = stage, message

    def __str__(self) -> str:
        return f"{self.stage}: {self.message}"


@contextlib.contextmanager
def _stage(name: str):
    """Tag any failure inside with the stage it happened in (config errors and StageErrors pass as they are)."""
    try:
        yield
    except (ConfigError, StageError):
        raise
    except Exception as e:
        cause = getattr(e, "cause", None)  # a RayTaskError: name the error raised on the worker, not Ray's wrapper
        root = cause if isinstance(cause, BaseException) else e
        raise StageError(name, f"{type(root).__name__}: {root}") from e


def teacher_problem(summary: dict) -> str | None:
    """Why a teacher output is not worth training on (pure), with what to change; None when it is usable."""
    samples = summary.get("samples", 0)
    ok = (summary.get("status_counts") or {}).get("ok", 0)
    backend = summary.get("backend", "?")
    if not summary.get("examples") or not samples:
        return "the teacher produced no samples (no examples were read); check data.data_dir and data.task"
    failed = samples - ok
    if failed / samples > MAX_FAILED_SAMPLE_SHARE:
        counts = ", ".join(f"{k} {v}" for k, v in (summary.get("status_counts") or {}).items() if k != "ok" and v)
        return (f"{failed} of {samples} teacher samples failed ({counts}; reasons in teacher/errors.jsonl); "
                f"fix teacher.backend={backend} (its model, endpoint or data) and run again with a new --out")
    if summary.get("examples_without_positive", 0) >= summary["examples"]:
        return (f"no example has a positive rationale (teacher accuracy {summary.get('teacher_accuracy', 0):.1%}); "
                f"a different teacher.backend or self_consistency.positive_rule is needed (with a new --out)")
    return None


def check_runnable(cfg: Config, methods: tuple[str, ...]) -> None:
    """Everything that can be refused before a run starts: unknown methods, a teacher that cannot serve the task."""
    from qcrd_ray.teacher.sources import check_teacher

    for method in methods:
        try:
            method_spec(method)
        except ValueError as e:
            raise ConfigError(f"--methods: {e}") from None
    check_teacher(cfg)


def run_pipeline(cfg: Config, run_dir: str | Path, methods: tuple[str, ...] | None = None,
                 address: str | None = None) -> dict:
    """Run every stage that has no complete output yet; returns {"teacher": summary, "methods": {...}}.
    Raises ConfigError before anything starts, StageError naming the stage that failed."""
    from qcrd_ray import trackers
    from qcrd_ray.evaluate import evaluate_once
    from qcrd_ray.ray_utils import init_ray
    from qcrd_ray.report import write_report
    from qcrd_ray.teacher.pipeline import run_teacher
    from qcrd_ray.train.trainer import run_training

    layout = RunLayout.at(str(run_dir))
    methods = tuple(methods or (cfg.train.method,))
    check_runnable(cfg, methods)
    check_same_config(layout.config, cfg, layout.root)
    init_ray(address)

    teacher = storage.read_json(layout.teacher_summary)
    with _stage("teach"):
        if teacher is None:
            log.info("stage teach → %s", layout.teacher)
            teacher = run_teacher(cfg, layout.teacher)
        else:
            log.info("stage teach: reusing %s", layout.teacher)
    problem = teacher_problem(teacher)
    if problem:
        raise StageError("teach", problem)

    results: dict[str, dict] = {}
    for method in methods:
        mcfg = cfg.replace(train={"method": method})
        where = layout.method(method)
        with _stage(f"train {method}"):
            if not storage.is_complete(where.model):  # the export writes its marker last
                log.info("stage train (%s) → %s", method, where.root)
                run_training(mcfg, layout.teacher, where.root)
            else:
                log.info("stage train (%s): reusing %s", method, where.model)
        evals = {}
        for mode in method_spec(method).eval_modes:
            with _stage(f"eval {method} {mode}"):
                evals[mode] = evaluate_once(where.model, mcfg, cfg.data.eval_split, mode,
                                            where.eval(cfg.data.eval_split, mode))
        trackers.log_results(mcfg, where.root, {f"{cfg.data.eval_split}_{m}": e["accuracy"] for m, e in evals.items()})
        results[method] = {"dir": where.root, "eval": evals}
    with _stage("report"):
        report = write_report(layout, cfg, teacher, results)
    return {"run_dir": layout.root, "report": report, "teacher": teacher, "methods": results}


def comparison_table(results: dict[str, dict]) -> str:
    """One line per method: accuracy in predict and explain mode."""
    lines = [f"{'method':<10} {'predict acc':>12} {'explain acc':>12} {'n':>6}"]
    for method, r in results.items():
        pred, expl = r["eval"].get("predict"), r["eval"].get("explain")
        fmt = lambda m: f"{100 * m['accuracy']:11.2f}%" if m else f"{'-':>12}"  # noqa: E731
        lines.append(f"{method:<10} {fmt(pred)} {fmt(expl)} {pred['n'] if pred else '-':>6}")
    return "\n".join(lines)
