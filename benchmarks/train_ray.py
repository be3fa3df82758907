"""Training on Ray: what the Ray roles of the trainer cost, each against a baseline measured in the same run.

1. ``publish``  — rank 0's one ``SnapshotStore.publish.remote(round, cpu_state_dict(model))`` call for a
   T5-small-shaped model (60 M parameters): the time the caller blocks (state dict + serialising the argument
   into the object store) and the time until the store holds it (``ray.get`` on the call's ref), with and without
   the store's on-disk copy (the trainer runs with one, for resumption). Baseline: ``ray.put`` of the same state
   dict in the caller. Target: publish <= 0.5 s, one call.
2. ``negatives`` — ``run_training`` (qcrd, tiny student, synthetic teacher rows from ``run_teacher``) with student
   negatives (snapshot store + sampler actor) against the same config with ``loss.negatives=teacher`` (no
   sampler): the trainer's wait for negatives at each round end (``neg_wait_s`` / ``neg_wait_share`` from
   RUN/train/metrics.jsonl) and the slowdown of a round when the sampler shares the cores. Target: wait <= 5 %
   of the round.
3. ``step`` — N optimizer steps of ``DistillModel`` in a 1-worker ``TorchTrainer`` (only the step loop is timed,
   inside the worker; start-up is reported apart) against the same N steps of the same model, batch and torch
   threads in this process, before and after the Ray run. Target: <= 1.1x.

    python benchmarks/train_ray.py                                  # all three, default sizes
    python benchmarks/train_ray.py --parts step --steps 10          # one part, quick
    python benchmarks/train_ray.py --publish-shape tiny --examples 64 --rounds 3 --steps 5   # smoke run

Starts its own local Ray (2 CPUs) and shuts it down; record results in docs/benchmarks.md ("Training on Ray").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

# Ray Train's health check otherwise makes every report block ~2 s (as in tests/conftest.py).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402
from transformers import T5Config, T5ForConditionalGeneration  # noqa: E402

from qcrd_ray import students as student_lib  # noqa: E402
from qcrd_ray.config import Config, from_dict  # noqa: E402
from qcrd_ray.qcrd.discriminator import Discriminator  # noqa: E402
from qcrd_ray.actors.snapshots import SnapshotStore, cpu_state_dict  # noqa: E402
from qcrd_ray.qcrd.step import DistillModel, make_batch  # noqa: E402
from qcrd_ray.qcrd.targets import tokenizer_texts  # noqa: E402
from qcrd_ray.ray_utils import worker_runtime_env  # noqa: E402
from qcrd_ray.teacher.pipeline import iter_teacher_rows, run_teacher  # noqa: E402
from qcrd_ray.train.trainer import run_training  # noqa: E402

PUBLISH_SHAPES = {
    # t5-small (tied embeddings): 60.5 M parameters
    "small": dict(d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, vocab_size=32128),
    "tiny": dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=800),
}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def header(text: str) -> None:
    print(f"\n== {text}\n   (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)


# ---------------------------------------------------------------- 1. snapshot publish


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as a plain dict of tensors: Ray pickles each tensor the torch way, aliases included."""
    return dict(cpu_state_dict(model))


def bench_publish(args) -> dict:
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**PUBLISH_SHAPES[args.publish_shape]))
    n_params = model.num_parameters()
    state = cpu_state_dict(model)
    mbytes = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    unique = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in state.values()}.values()) / 2**20
    header(f"snapshot publish: {n_params / 1e6:.1f} M parameters, state dict {mbytes:.0f} MiB over {len(state)} "
           f"keys, {unique:.0f} MiB of distinct tensors (T5's embedding is under 4 keys), {args.repeats} repeats")

    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as persist:
        plain_store = SnapshotStore.remote(j=1)
        store = SnapshotStore.remote(j=1)
        disk_store = SnapshotStore.remote(j=1, persist_dir=persist)  # as the trainer runs it (resumable)
        ray.get([s.rounds.remote() for s in (plain_store, store, disk_store)])  # actors up before timing

        def put(make):
            def call(r):
                ray.put(make(model))  # held in the object store when it returns (and freed right away)
            return call

        def publish(target, make):
            return lambda r: target.publish.remote(r, make(model))  # the trainer's call

        variants = {
            "ray.put, plain dict": put(plain_state_dict),  # the baseline: what Ray does with a state dict
            "ray.put, SnapshotState": put(cpu_state_dict),
            "publish, plain dict": publish(plain_store, plain_state_dict),  # before SnapshotState
            "publish": publish(store, cpu_state_dict),
            "publish + disk copy": publish(disk_store, cpu_state_dict),
        }
        for r in range(args.repeats):  # round-robin, so load from other processes hits every variant alike
            for name, call in variants.items():
                t0 = time.perf_counter()
                ref = call(r)
                t1 = time.perf_counter()
                if ref is not None:
                    ray.get(ref)  # a publish is held when the actor has answered
                times = results.setdefault(name, {"caller": [], "held": []})
                times["caller"].append(t1 - t0)
                times["held"].append(time.perf_counter() - t0)
                del ref
        for actor in (plain_store, store, disk_store):
            ray.kill(actor)

    base = median(results["ray.put, plain dict"]["caller"])
    print(f"{'variant':<24} {'caller blocks s':>16} {'store holds it s':>17} {'caller / put':>13} "
          f"{'held / put':>11}")
    summary = {"params_m": n_params / 1e6, "mib": mbytes}
    for name, times in results.items():
        caller, held = median(times["caller"]), median(times["held"])
        print(f"{name:<24} {caller:>16.3f} {held:>17.3f} {caller / base:>12.2f}x {held / base:>10.2f}x")
        summary[name] = {"caller_s": caller, "held_s": held}
    blocked = summary["publish + disk copy"]["caller_s"]
    print(f"target: the trainer's call blocks rank 0 <= 0.5 s -> {'met' if blocked <= 0.5 else 'MISSED'} "
          f"({blocked:.3f} s)")
    return summary


# ---------------------------------------------------------------- 2. waiting for negatives


def train_config(args) -> Config:
    return from_dict({
        "data": {"task": "synthetic", "synthetic_train_size": args.examples, "synthetic_eval_size": 8},
        "teacher": {"backend": "synthetic", "k": 5, "min_actors": 1, "max_actors": 1},
        "discriminator": {"hidden": 32, "pretrain_steps": 10, "refresh_steps": 5, "pretrain_batch_size": 8},
        "snapshots": {"j": 1, "max_new_tokens": args.max_new_tokens, "sampler_num_cpus": 0.5},
        "train": {"num_workers": args.workers, "num_cpus_per_worker": 0.5, "batch_size": 8, "rounds": args.rounds,
                  # two step logs a round: the first holds round 0's wait; reports sparser than Ray Train's
                  # health-check interval do not wait for the controller (see part step)
                  "round_steps": args.round_steps, "log_every": max(1, args.round_steps // 2)},
    })


def read_rounds(run_dir: Path) -> tuple[list[dict], float]:
    """Round-end lines of metrics.jsonl, and the wait for the first round's negatives (on the first step line)."""
    lines = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [m for m in lines if "completed_rounds" in m]
    steps = [m for m in lines if "loss" in m]
    return rounds, (steps[0].get("neg_wait_s", 0.0) if steps else 0.0)


def bench_negatives(args, work: Path) -> dict:
    cfg = train_config(args)
    teacher_dir = work / "teacher"
    t0 = time.perf_counter()
    run_teacher(cfg, teacher_dir)
    header(f"waiting for negatives: run_training qcrd, {args.examples} synthetic rows (teacher {time.perf_counter() - t0:.0f} s), "
           f"{args.workers} workers x 0.5 CPU, batch 8/worker, {args.rounds} rounds x {args.round_steps} steps, "
           f"sampler 1 actor x 0.5 CPU, j = 1, {args.max_new_tokens} new tokens")
    variants = {"student negatives": cfg, "teacher negatives only": cfg.replace(loss={"negatives": "teacher"})}
    out = {}
    for name, vcfg in variants.items():
        run_dir = work / name.replace(" ", "_")
        t0 = time.perf_counter()
        run_training(vcfg, teacher_dir, run_dir)  # train.method: qcrd (the default)
        wall = time.perf_counter() - t0
        rounds, first_wait = read_rounds(run_dir)
        # round 0 also pays warm-up; every round but the last ends by collecting the next round's negatives
        steady = [m for m in rounds if m["completed_rounds"] > 1] or rounds
        waited = [m for m in rounds if m["completed_rounds"] < args.rounds]
        out[name] = {
            "wall_s": wall, "first_wait_s": first_wait,
            "round_s": median([m["round_s"] for m in steady]),
            "neg_wait_s": median([m["neg_wait_s"] for m in waited]),
            "neg_wait_share": median([m["neg_wait_share"] for m in waited]),
            "max_neg_wait_share": max((m["neg_wait_share"] for m in waited), default=0.0),
            "per_round": [(m["completed_rounds"], round(m["round_s"], 2), round(m["neg_wait_s"], 3))
                          for m in rounds],
        }
    extra = extra_candidate_cost(args, cfg, teacher_dir, work / "student_negatives")
    base = out["teacher negatives only"]
    print(f"{'variant':<24} {'run s':>7} {'round s (med)':>14} {'vs no sampler':>14} {'wait s (med)':>13} "
          f"{'wait share':>11} {'max share':>10} {'1st-round wait s':>17}")
    for name, m in out.items():
        print(f"{name:<24} {m['wall_s']:>7.1f} {m['round_s']:>14.2f} {m['round_s'] / base['round_s']:>13.2f}x "
              f"{m['neg_wait_s']:>13.3f} {m['neg_wait_share']:>10.1%} {m['max_neg_wait_share']:>10.1%} "
              f"{m['first_wait_s']:>17.2f}")
        print(f"  per round (completed, round_s, neg_wait_s): {m['per_round']}")
    slowdown = out["student negatives"]["round_s"] / base["round_s"]
    print(f"the step itself, in-process, 1 thread: with the student negative {extra:.2f}x the step without it; "
          f"the rest of the round slowdown, {slowdown / extra:.2f}x, is the sampler competing for the cores")
    share = out["student negatives"]["neg_wait_share"]
    print(f"target: wait <= 5 % of the round -> {'met' if share <= 0.05 else 'MISSED'} ({share:.1%})")
    return out


def extra_candidate_cost(args, cfg: Config, teacher_dir: Path, run_dir: Path) -> float:
    """Step time with one student negative per example / without it (same model, rows and batch, no sampler
    running): the share of the round slowdown that is the extra candidate, not the sampler's CPU use."""
    model_dir = str(run_dir / "train" / "init_model")
    _, tok = student_lib.load_pretrained(model_dir)
    rows = sorted(iter_teacher_rows(teacher_dir), key=lambda r: r["id"])[:cfg.train.batch_size]
    gen = torch.Generator().manual_seed(0)
    sampled = [tok.decode(torch.randint(3, len(tok), (args.max_new_tokens,), generator=gen).tolist(),
                          skip_special_tokens=True) for _ in rows]  # an untrained student's output: as long as allowed
    with_neg = [{**r, "student_negatives": [t], "negative_round": 0} for r, t in zip(rows, sampled)]
    times = {}
    for name, batch_rows in (("without", rows), ("with", with_neg)):
        batch = make_batch(batch_rows, tok, cfg)
        times[name] = median(run_steps(model_dir, batch, cfg, "qcrd", args.steps, args.repeats, threads=1))
    return times["with"] / times["without"]


# ---------------------------------------------------------------- 3. Ray Train step vs bare torch


def step_config(args) -> Config:
    d = args.step_d_model
    return from_dict({"student": {"tiny_d_model": d, "tiny_d_ff": 2 * d, "tiny_layers": args.step_layers,
                                  "tiny_heads": 4, "tiny_vocab_size": 800}})


def run_steps(model_dir: str, batch, cfg: Config, method: str, steps: int, repeats: int, threads: int,
              prepare=None, after_step=None) -> list[float]:
    """``repeats`` timings of ``steps`` full optimizer steps (the trainer's step: forward, backward, clip, AdamW),
    each followed by ``after_step()`` when given."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    student, _ = student_lib.load_pretrained(model_dir)
    cfg = cfg.replace(train={"method": method})
    disc = Discriminator.from_student(student, cfg.discriminator) if method == "qcrd" else None
    model = DistillModel(student, disc, cfg)
    if prepare is not None:
        model = prepare(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if after_step is not None:
            after_step()

    step()  # warm-up (allocator, first-call dispatch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - t0) / steps)
    return times


def _ray_step_loop(config: dict) -> None:
    start = time.time()
    common = (config["model_dir"], config["batch"], config["cfg"], config["method"], config["steps"],
              config["repeats"], config["threads"])
    times = run_steps(*common, prepare=ray.train.torch.prepare_model)
    # the same steps, each reporting a metric as the trainer does every train.log_every steps
    reporting = run_steps(*common, prepare=ray.train.torch.prepare_model,
                          after_step=lambda: ray.train.report({"loss": 0.0}))
    # a file, not ray.train.report: Ray Train keeps no metrics of a report without a checkpoint
    Path(config["out"]).write_text(json.dumps({"times": times, "reporting": reporting, "loop_start": start,
                                               "threads": torch.get_num_threads()}))


def bench_step(args, work: Path) -> dict:
    cfg = step_config(args)
    rows = list(iter_teacher_rows(work / "teacher")) if (work / "teacher").is_dir() else None
    if rows is None:
        run_teacher(train_config(args), work / "teacher")
        rows = list(iter_teacher_rows(work / "teacher"))
    torch.manual_seed(0)
    model, tok = student_lib.load_student(cfg.student, tokenizer_texts(rows))
    model_dir = str(student_lib.save_student(model, tok, work / "step_model"))
    batch = make_batch(rows[:args.step_batch], tok, cfg.replace(train={"method": args.step_method}))
    header(f"1-worker Ray Train step vs bare torch: {args.step_method}, {model.num_parameters() / 1e6:.2f} M "
           f"parameters (d_model {args.step_d_model}, {args.step_layers}+{args.step_layers} layers), batch "
           f"{args.step_batch}, {args.threads} torch thread(s), {args.repeats} x {args.steps} steps")
    common = (model_dir, batch, cfg, args.step_method, args.steps, args.repeats, args.threads)
    bare_before = run_steps(*common)
    t0 = time.time()
    trainer = TorchTrainer(
        _ray_step_loop,
        train_loop_config={"model_dir": model_dir, "batch": batch, "cfg": cfg, "method": args.step_method,
                           "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
                           "out": str(work / "ray_step.json")},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.threads}),
        run_config=ray.train.RunConfig(name="step", storage_path=str(work / "ray_results")),
    )
    trainer.fit()
    fit_s = time.time() - t0
    bare_after = run_steps(*common)
    in_worker = json.loads((work / "ray_step.json").read_text())
    ray_times, startup = in_worker["times"], in_worker["loop_start"] - t0
    bare = median(bare_before + bare_after)
    best = min(bare_before + bare_after)
    print(f"{'variant':<34} {'ms / step (med)':>16} {'vs bare':>8} {'best vs best':>13}   per repeat (ms)")
    for name, times in (("bare torch, before", bare_before), ("Ray Train, 1 worker", ray_times),
                        ("Ray Train, report every step", in_worker["reporting"]), ("bare torch, after", bare_after)):
        print(f"{name:<34} {1e3 * median(times):>16.1f} {median(times) / bare:>7.2f}x {min(times) / best:>12.2f}x   "
              f"{[round(1e3 * t, 1) for t in times]}")
    print(f"(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S')}: the controller "
          f"drains one report per interval, so a report made sooner after the last one waits for it)")
    ratio = median(ray_times) / bare
    print(f"Ray Train start-up (fit() to the loop's first line): {startup:.1f} s; whole fit(): {fit_s:.1f} s; "
          f"worker torch threads: {in_worker['threads']}")
    print(f"target: <= 1.1x -> {'met' if ratio <= 1.1 else 'MISSED'} ({ratio:.2f}x)")
    return {"bare_ms": 1e3 * bare, "ray_ms": 1e3 * median(ray_times), "ratio": ratio, "startup_s": startup}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default="publish,negatives,step", help="comma-separated: publish, negatives, step")
    p.add_argument("--repeats", type=int, default=5, help="repeats of each timed measurement (median reported)")
    p.add_argument("--publish-shape", choices=sorted(PUBLISH_SHAPES), default="small",
                   help="model published: small = T5-small shape, 60 M parameters")
    p.add_argument("--examples", type=int, default=256, help="synthetic training rows (parts negatives, step)")
    p.add_argument("--workers", type=int, default=2, help="train workers for part negatives (0.5 CPU each)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-steps", type=int, default=16, help="optimizer steps per round")
    p.add_argument("--max-new-tokens", type=int, default=64, help="sampler: new tokens per negative")
    p.add_argument("--step-method", choices=("dss", "finetune"), default="dss")
    p.add_argument("--step-d-model", type=int, default=256)
    p.add_argument("--step-layers", type=int, default=2)
    p.add_argument("--step-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="steps per timed repeat (part step)")
    p.add_argument("--threads", type=int, default=1, help="torch threads = CPUs of the Ray Train worker")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(parts) - {"publish", "negatives", "step"}
    if unknown:
        p.error(f"unknown parts: {sorted(unknown)}")

    print(f"load average at start: {os.getloadavg()}", flush=True)
    benches = {"publish": lambda work: bench_publish(args), "negatives": lambda work: bench_negatives(args, work),
               "step": lambda work: bench_step(args, work)}
    with tempfile.TemporaryDirectory(prefix="train_ray_") as tmp:
        for part in parts:
            # a fresh local Ray per part: a TorchTrainer started in the driver after run_training's trainer ended
            # lost its placement group mid-run twice here (Ray 2.60)
            ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
                     log_to_driver=False, runtime_env=worker_runtime_env())
            try:
                benches[part](Path(tmp))
            finally:
                ray.shutdown()
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
