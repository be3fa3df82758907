"""`qcrd run`: teach → train (one or more methods) → evaluate → report, in one run directory.

Every stage writes its outputs under RUN and is skipped when they are already complete, so rerunning the same
command after an interruption continues where it stopped (the teacher resumes by shard, training from its last
round checkpoint).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from qcrd_ray.config import Config, ConfigError, from_dict

log = logging.getLogger(__name__)

EVAL_MODES = {"finetune": ("predict",), "dss": ("predict", "explain"), "qcrd": ("predict", "explain")}


def _check_same_config(run_dir: Path, cfg: Config) -> None:
    """Refuse to mix stage outputs made under another config into this run."""
    path = run_dir / "config.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(cfg.to_yaml())
        return
    old = from_dict(yaml.safe_load(path.read_text())).to_dict()
    new = cfg.to_dict()
    # The method list is a property of the invocation, not of the stored outputs.
    for resolved in (old, new):
        resolved["train"].pop("method")
    changed = [f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
    if changed:
        raise ConfigError(
            f"{run_dir} was made with a different config ({', '.join(changed[:6])}"
            f"{' …' if len(changed) > 6 else ''} differ); pass the same config to continue it or choose a new --out"
        )


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def run_pipeline(cfg: Config, run_dir: str | Path, methods: tuple[str, ...] | None = None,
                 address: str | None = None) -> dict:
    """Run every stage that has no complete output yet; returns {"teacher": summary, "methods": {...}}."""
    from qcrd_ray.evaluate import evaluate
    from qcrd_ray.ray_utils import init_ray
    from qcrd_ray.report import write_report
    from qcrd_ray.teacher.pipeline import run_teacher
    from qcrd_ray.train.trainer import run_training

    run_dir = Path(run_dir)
    methods = tuple(methods or (cfg.train.method,))
    _check_same_config(run_dir, cfg)
    init_ray(address)

    teacher_dir = run_dir / "teacher"
    teacher = _read_json(teacher_dir / "summary.json")
    if teacher is None:
        log.info("stage teach → %s", teacher_dir)
        teacher = run_teacher(cfg, teacher_dir)
    else:
        log.info("stage teach: reusing %s", teacher_dir)

    results: dict[str, dict] = {}
    for method in methods:
        mcfg = cfg.replace(train={"method": method})
        method_dir = run_dir / method
        if not (method_dir / "model" / "config.json").exists():
            log.info("stage train (%s) → %s", method, method_dir)
            run_training(mcfg, teacher_dir, method_dir, method=method)
        else:
            log.info("stage train (%s): reusing %s", method, method_dir / "model")
        evals = {}
        for mode in EVAL_MODES[method]:
            out = method_dir / "eval" / f"{cfg.data.eval_split}-{mode}"
            metrics = _read_json(out / "metrics.json")
            if metrics is None:
                log.info("stage eval (%s, %s) → %s", method, mode, out)
                metrics = evaluate(method_dir / "model", mcfg, cfg.data.eval_split, mode=mode, out_dir=out)
            evals[mode] = metrics
        results[method] = {"dir": str(method_dir), "eval": evals}

    report = write_report(run_dir, cfg, teacher, results)
    return {"run_dir": str(run_dir), "report": str(report), "teacher": teacher, "methods": results}


def comparison_table(results: dict[str, dict]) -> str:
    """One line per method: accuracy in predict and explain mode."""
    lines = [f"{'method':<10} {'predict acc':>12} {'explain acc':>12} {'n':>6}"]
    for method, r in results.items():
        pred, expl = r["eval"].get("predict"), r["eval"].get("explain")
        fmt = lambda m: f"{100 * m['accuracy']:11.2f}%" if m else f"{'-':>12}"  # noqa: E731
        lines.append(f"{method:<10} {fmt(pred)} {fmt(expl)} {pred['n'] if pred else '-':>6}")
    return "\n".join(lines)
