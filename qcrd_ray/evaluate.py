"""Accuracy of a trained student on one split, in one of the two modes of docs/design.md, "The algorithm".

- ``predict``: greedy decoding of ``predict: x``; the output is the answer.
- ``explain``: greedy decoding of ``explain: x``; the student writes its rationale and ``The answer is …``, and the
  answer is parsed from that sentence.

Answers are parsed and scored with the task's own rules (``answers.parse_answer`` / ``answers.is_correct``). In
explain mode, a task that says what its rationales must get right (``TaskSpec.check_rationale``: testbed v2's
operation and numbers) has each rationale checked too, and ``metrics.json`` gives each check's share
(``rationale_checks``). Each example's input, gold label, raw output, parsed prediction, rationale, checks and
verdict go to ``predictions.jsonl``; the totals go to ``metrics.json``. The model and the output folder may be
local paths or URIs (``s3://…``): a model on storage is downloaded into this node's cache
(``storage.download_dir``, complete uploads only), and the outputs are written through ``qcrd_ray.storage``
(atomically).
"""

from __future__ import annotations

import functools
import logging

from qcrd_ray import console, storage
from qcrd_ray import students as student_lib
from qcrd_ray.config import Config
from qcrd_ray.data import answers, prompts
from qcrd_ray.data.loaders import load_split
from qcrd_ray.data.tasks import get_task
from qcrd_ray.runs import resolve_model

log = logging.getLogger(__name__)

MODES = ("predict", "explain")
_CHUNK = 64  # examples per progress-bar tick


def score_output(task, mode: str, output: str, gold: str, choices) -> dict:
    """One generated output → ``{prediction, rationale, correct}`` (pure)."""
    if mode == "explain":
        rationale, answer_text = prompts.split_explanation(output)
    else:
        rationale, answer_text = "", output
    prediction = answers.parse_answer(task, answer_text, choices)
    return {"prediction": prediction, "rationale": rationale,
            "correct": answers.is_correct(task, prediction, gold, choices)}


def rationale_shares(checks: list[dict | None]) -> dict[str, dict]:
    """Each check's share of the rationales it applies to (``{check: {"share", "n"}}``, checks that applied to
    none left out) from per-example results of ``TaskSpec.check_rationale`` (pure)."""
    out = {}
    for name in dict.fromkeys(k for c in checks if c for k in c):
        verdicts = [c[name] for c in checks if c and c.get(name) is not None]
        if verdicts:
            out[name] = {"share": sum(verdicts) / len(verdicts), "n": len(verdicts)}
    return out


def evaluate(model_dir, cfg: Config, split: str, mode: str = "predict", out_dir=None, *,
             batch_size: int = 32) -> dict:
    """Score the student at ``model_dir`` (a run, a method directory ``RUN/<method>`` or an HF model directory;
    see ``qcrd_ray.runs.resolve_model``) on ``split`` of ``cfg.data``. Writes ``predictions.jsonl`` and
    ``metrics.json`` to ``out_dir`` when given. Returns the metrics:
    ``task, split, mode, n, correct, accuracy, unparsed, rejected, too_long, out_of_memory, model`` (a prompt
    longer than the student reads, or one that exhausts memory in generate on its own, counts as wrong), and in
    explain mode for a task with rationale checks, ``rationale_checks`` (:func:`rationale_shares`)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    model_path = resolve_model(str(model_dir)).model_dir
    data = load_split(cfg.data, split)
    if not data.rows:
        raise ValueError(f"{cfg.data.task} {split}: no rows to evaluate ({data.summary.get('rejected', 0)} rejected)")
    task = get_task(cfg.data.task, cfg.data.answer_type)
    check = functools.partial(task.check_rationale, cfg.data) if mode == "explain" and task.check_rationale else None
    local = storage.download_dir(model_path) if storage.is_uri(model_path) else model_path
    model, tokenizer = student_lib.load_pretrained(local, dtype=cfg.student.dtype)
    max_new_tokens = cfg.student.max_target_len
    # a prompt longer than the student reads is never truncated: it counts as a wrong answer, named in rejects
    family = student_lib.family_of(model)
    too_long = {r["id"]: r for r in student_lib.long_prompts(
        family, tokenizer, data.rows, cfg.student.max_input_len, modes=(mode,))}

    records = []
    label = f"eval {split} ({mode})"
    with console.progress(label, total=len(data.rows), unit="ex", summarize=False) as bar:
        for start in range(0, len(data.rows), _CHUNK):
            chunk = data.rows[start:start + _CHUNK]
            rows = [r for r in chunk if r["id"] not in too_long]
            failed: list[int] = []  # inputs that exhausted memory alone: wrong, named, and the evaluation goes on
            outputs = student_lib.generate(
                model, tokenizer, [prompts.student_input(mode, r["input"]) for r in rows],
                max_new_tokens=max_new_tokens, batch_size=batch_size, failed=failed) if rows else []
            # a prompt too long to read wrote no rationale: it fails every check that applies to its question
            records += [{"id": r["id"], "input": r["input"], "gold": r["label"], "output": "", "prediction": None,
                         "rationale": "", "correct": False, "too_long": True,
                         **({"checks": check(r["input"], "")} if check else {})} for r in chunk if r["id"] in too_long]
            for i, (row, output) in enumerate(zip(rows, outputs)):
                scored = score_output(task, mode, output, row["label"], row["choices"])
                if i in failed:
                    scored = {**scored, "correct": False, "out_of_memory": True}
                if check:
                    scored["checks"] = check(row["input"], scored["rationale"])
                records.append({"id": row["id"], "input": row["input"], "gold": row["label"], "output": output,
                                **scored})
            bar.update(len(chunk))

    correct = sum(r["correct"] for r in records)
    metrics = {"task": cfg.data.task, "split": split, "mode": mode, "n": len(records), "correct": correct,
               "accuracy": correct / len(records), "unparsed": sum(r["prediction"] is None for r in records),
               "rejected": len(data.rejects), "too_long": len(too_long),
               "out_of_memory": sum(bool(r.get("out_of_memory")) for r in records), "model": str(model_path)}
    if check:
        shares = rationale_shares([r["checks"] for r in records])
        if shares:
            metrics["rationale_checks"] = shares
    if out_dir is not None:  # metrics.json last: its presence means the evaluation is complete
        storage.write_jsonl(storage.join(out_dir, "rejects.jsonl"), data.rejects + list(too_long.values()))
        storage.write_jsonl(storage.join(out_dir, "predictions.jsonl"), records)
        storage.write_json(storage.join(out_dir, "metrics.json"), metrics)
    checked = ", ".join(f"{name.replace('_', ' ')} {c['share']:.0%} of {c['n']}"
                        for name, c in metrics.get("rationale_checks", {}).items())
    console.summary(f"{label}: accuracy {metrics['accuracy']:.2%} ({correct}/{len(records)}, "
                    f"{metrics['unparsed']} unparsed){'; rationales: ' + checked if checked else ''}")
    return metrics


def recheck_rationales(cfg: Config, eval_dir) -> dict[str, dict]:
    """``rationale_checks`` of the finished explain evaluation in ``eval_dir``, computed again from its
    predictions.jsonl, so an evaluation written before its task's checks existed gains them (``qcrd sweep
    --rescore-valid``); {} when the task has no checks or there are no predictions."""
    check = get_task(cfg.data.task, cfg.data.answer_type).check_rationale
    records = storage.read_jsonl(storage.join(eval_dir, "predictions.jsonl")) if check else []
    return rationale_shares([check(cfg.data, r["input"], r["rationale"]) for r in records])


def evaluate_once(model_dir, cfg: Config, split: str, mode: str, out_dir) -> dict:
    """The metrics in ``out_dir``, else :func:`evaluate` writing them there. ``metrics.json`` is written last, so
    its presence means an earlier evaluation finished: a rerun `qcrd run`, a continued sweep and
    ``--rescore-valid`` skip it (docs/design.md, "Stage entrypoints")."""
    metrics = storage.read_json(storage.join(out_dir, "metrics.json"))
    if metrics is None:
        log.info("eval %s (%s) → %s", split, mode, out_dir)
        metrics = evaluate(model_dir, cfg, split, mode=mode, out_dir=out_dir)
    return metrics
