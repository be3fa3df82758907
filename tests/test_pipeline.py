"""`qcrd run` end to end on a small synthetic task: teach → train (2 DDP workers) → eval → report. The finished
run is conftest's shared_run (one subprocess run per session, also read by test_console and test_reproducibility)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import SMALL, qcrd_run_args
from qcrd_ray.cli import main
from qcrd_ray.testing import free_port, patience


@pytest.fixture(scope="module")
def finished_run(shared_run, ray_session):
    """conftest's shared run (`qcrd run --methods dss,qcrd`, a subprocess with its own Ray); the session's Ray is
    for the tests here that rerun or serve it in this process."""
    return shared_run.out


def test_run_writes_every_stage_and_a_report_with_its_numbers(finished_run):
    out = finished_run
    teacher = json.loads((out / "teacher" / "summary.json").read_text())
    assert teacher["examples"] == 64
    for method in ("dss", "qcrd"):
        assert (out / method / "model" / "config.json").exists()
        for mode in ("predict", "explain"):
            metrics = json.loads((out / method / "eval" / f"test-{mode}" / "metrics.json").read_text())
            assert metrics["n"] == 24 and metrics["mode"] == mode
    report = (out / "report.md").read_text()
    qcrd_predict = json.loads((out / "qcrd" / "eval" / "test-predict" / "metrics.json").read_text())
    assert re.search(rf"\| qcrd \| {100 * qcrd_predict['accuracy']:.2f} \|", report)
    for figure in re.findall(r"\]\((figures/[^)]+\.png)\)", report):
        assert (out / figure).stat().st_size > 1000
    assert "qcrd-training.png" in report and "dss-training.png" in report
    assert "discriminator scores" in report.lower()
    trained_on = re.findall(r"Trained on: (.+) \(`train/environment.jsonl`\)", report)  # one per method
    assert len(trained_on) == 2 and f" · {torch.backends.cpu.get_cpu_capability()} · " in trained_on[0]
    assert "\n  k: 3\n" in report  # the resolved config is the one that ran


def test_rerun_reuses_finished_stages(finished_run, capsys):
    model = finished_run / "qcrd" / "model" / "config.json"
    before = model.stat().st_mtime_ns
    assert main(qcrd_run_args(finished_run)) == 0
    assert model.stat().st_mtime_ns == before
    printed = capsys.readouterr().out
    assert "qcrd serve --model" in printed and "report:" in printed


def test_rerun_with_another_config_is_refused(finished_run, capsys):
    assert main(["run", "--out", str(finished_run), *SMALL, "--set", "teacher.k=4"]) == 2
    assert "teacher.k" in capsys.readouterr().err


def test_printed_serve_command_serves_the_run_without_a_task(finished_run, shared_run):
    """`qcrd run` prints `qcrd serve --model RUN/<method>`: that exact path serves a model that knows its task,
    so a request without `task` is answered in predict and explain mode (issue 10.1). The line is the one the
    command printed on its stdout (a rerun prints it too: test_rerun_reuses_finished_stages)."""
    import httpx
    from ray import serve

    from qcrd_ray.cli import build_parser, load_config_from_args
    from serve.app import build

    [command] = [line for line in shared_run.stdout.splitlines() if line.startswith("serve it: ")]
    argv = command.removeprefix("serve it: qcrd ").split()
    assert argv == ["serve", "--model", str(finished_run / "qcrd")]
    args = build_parser(load_subcommands="serve").parse_args([*argv, "--port", str(free_port())])
    cfg = load_config_from_args(args, host="serve.host", port="serve.port")
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})
    try:
        serve.run(build(args.model, cfg, args.name), name="printed", route_prefix="/")
        url = f"http://127.0.0.1:{cfg.serve.port}/v1/predict"
        question = "Tom has 5 apples. He buys 3 more.\nHow many apples does he have now?"
        for explain in (False, True):
            r = httpx.post(url, json={"input": question, "explain": explain}, timeout=patience(120))
            assert r.status_code == 200, r.text
            assert r.json()["model"] == f"{finished_run.name}/qcrd"
            assert (r.json()["rationale"] is not None) == explain
    finally:
        serve.shutdown()



def test_a_causal_lora_run_prints_a_serve_command_that_chats_with_and_without_streaming(ray_session, tmp_path,
                                                                                         capsys):
    """Issue 20's done-when: `qcrd run --set student.family=causal --set student.lora.r=8` runs every stage, exports
    the student merged and as an adapter, and the serve command it prints answers the official OpenAI client's
    chat completions, streamed and not (the same greedy text)."""
    import openai
    from ray import serve

    from qcrd_ray.cli import build_parser, load_config_from_args
    from serve.app import build

    out = tmp_path / "causal"
    assert main(["run", "--out", str(out), "--set", "student.family=causal", "--set", "student.lora.r=8",
                 *SMALL]) == 0
    printed = capsys.readouterr().out
    assert (out / "qcrd" / "model" / "config.json").is_file()
    assert (out / "qcrd" / "adapter" / "adapter_config.json").is_file()
    for mode in ("predict", "explain"):
        assert json.loads((out / "qcrd" / "eval" / f"test-{mode}" / "metrics.json").read_text())["n"] == 24
    [command] = [line for line in printed.splitlines() if line.startswith("serve it: ")]
    args = build_parser(load_subcommands="serve").parse_args(
        [*command.removeprefix("serve it: qcrd ").split(), "--port", str(free_port())])
    cfg = load_config_from_args(args, host="serve.host", port="serve.port")
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})
    try:
        serve.run(build(args.model, cfg, args.name), name="causal", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.serve.port}/v1", api_key="unused",
                               timeout=patience(120))
        messages = [{"role": "user", "content": "Tom has 5 apples. He buys 3 more. How many apples does he have?"}]
        whole = client.chat.completions.create(model=f"{out.name}/qcrd", messages=messages, temperature=0,
                                               max_tokens=24)
        chunks = list(client.chat.completions.create(model=f"{out.name}/qcrd", messages=messages, temperature=0,
                                                     max_tokens=24, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    finally:
        serve.shutdown()


def test_eval_of_a_method_directory_uses_the_runs_config(finished_run, capsys):
    """`qcrd eval --model RUN/<method>` needs no --task or --config: the run's config (task, sizes) is used and
    the outputs land in RUN/<method>/eval."""
    assert main(["eval", "--model", str(finished_run / "dss"), "--mode", "explain", "--split", "valid",
                 "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (metrics["task"], metrics["mode"], metrics["split"]) == ("synthetic", "explain", "valid")
    assert (finished_run / "dss" / "eval" / "valid-explain" / "metrics.json").is_file()


def test_serve_config_yaml_with_its_model_path_set_serves_the_run(finished_run, tmp_path):
    """serve/config.yaml's builder with args.model = RUN/<method> (relative, as in the file) resolves the run's
    task: its app serves requests without `task`."""
    import os

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app

    raw = yaml.safe_load((Path(__file__).parents[1] / "serve" / "config.yaml").read_text())
    [app] = ServeDeploySchema.model_validate(raw).applications
    cwd = os.getcwd()
    os.chdir(finished_run.parent)
    try:
        bound = build_app({**app.args, "model": f"{finished_run.name}/qcrd"})
    finally:
        os.chdir(cwd)
    served = bound._bound_deployment.init_args[0]
    assert served.task == "synthetic" and served.model_dir == str(finished_run / "qcrd" / "model")


def test_a_failed_stage_ends_with_one_line_and_the_traceback_in_the_log(ray_session, tmp_path, capsys):
    """A teacher output with no usable sample stops the run before training, with one line naming the stage,
    why, and the log file; the traceback is in RUN/logs/qcrd.log, not on the console (issue 10.7 c, d)."""
    out = tmp_path / "run"
    # an OpenAI-compatible teacher that nobody serves: every request fails, as the cqa run did
    code = main(["run", "--out", str(out), *SMALL, "--set", "data.synthetic_train_size=8",
                 "--set", "teacher.backend=http", "--set", "teacher.base_url=http://127.0.0.1:9/v1",
                 "--set", "teacher.max_retries=0"])
    err = capsys.readouterr().err
    assert code == 1
    [line] = [x for x in err.splitlines() if x.startswith("qcrd run failed")]
    assert "teach:" in line and "teacher samples failed" in line and str(out / "logs" / "qcrd.log") in line
    assert "Traceback" not in err
    assert "Traceback" in (out / "logs" / "qcrd.log").read_text()
    assert not (out / "qcrd").exists()  # stopped before training


# ---------------------------------------------------------------------------------------------- pure parts


def test_layout_paths_join_on_strings_so_a_run_can_live_at_a_uri():
    from qcrd_ray.runs import RunLayout

    run = RunLayout("s3://bucket/run")
    assert run.config == "s3://bucket/run/config.yaml" and run.teacher == "s3://bucket/run/teacher"
    assert run.log_file == "s3://bucket/run/logs/qcrd.log" and run.report == "s3://bucket/run/report.md"
    qcrd = run.method("qcrd")
    assert qcrd.model == "s3://bucket/run/qcrd/model" and qcrd.metrics == "s3://bucket/run/qcrd/train/metrics.jsonl"
    assert qcrd.eval("test", "explain") == "s3://bucket/run/qcrd/eval/test-explain"
    assert qcrd.checkpoints.endswith("/qcrd/train/checkpoints") and qcrd.negatives.endswith("/train/negatives.jsonl")


def _fake_run(root: Path, methods=("dss", "qcrd"), task="svamp") -> Path:
    from qcrd_ray.config import Config

    root.mkdir(parents=True)
    (root / "config.yaml").write_text(Config().replace(data={"task": task}).to_yaml())
    for m in methods:
        (root / m / "model").mkdir(parents=True)
        (root / m / "model" / "config.json").write_text("{}")
    return root


def test_resolve_model_finds_the_run_and_its_method_from_any_entry_point(tmp_path):
    from qcrd_ray.runs import resolve_model

    run = _fake_run(tmp_path / "run")
    for given in (run / "dss", run / "dss" / "model"):
        r = resolve_model(str(given))
        assert r.model_dir == str(run / "dss" / "model")
        assert (r.config.data.task, r.config.train.method, r.run.root) == ("svamp", "dss", str(run))
        assert r.method.eval("test", "predict") == str(run / "dss" / "eval" / "test-predict")
    assert resolve_model(str(run)).model_dir == str(run / "qcrd" / "model")  # the run's train.method
    bare = tmp_path / "hf"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    r = resolve_model(str(bare))
    assert (r.model_dir, r.config, r.run, r.name) == (str(bare), None, None, "hf")
    with pytest.raises(FileNotFoundError, match="no model found"):
        resolve_model(str(tmp_path / "nothing"))


def test_a_runs_config_is_read_one_way_validated(tmp_path):
    """runs.load_run_config: what resolve_model, `qcrd run`'s same-config check, `qcrd report` and --rescore-valid
    read; a file that is not a config is refused naming it."""
    from qcrd_ray.config import ConfigError
    from qcrd_ray.runs import RunLayout, load_run_config

    run = RunLayout(str(_fake_run(tmp_path / "run")))
    assert load_run_config(run.config).data.task == "svamp"
    bad = tmp_path / "bad.yaml"
    for text, message in (("[1, 2]", "expected a mapping"), ("a: [", "not valid YAML"),
                          ("train: {rounds: -1}", "train.rounds")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_run_config(str(bad))


def test_resolve_model_refuses_a_run_with_several_methods_and_no_default(tmp_path):
    from qcrd_ray.runs import resolve_model

    run = _fake_run(tmp_path / "run", methods=("finetune", "dss"))
    with pytest.raises(FileNotFoundError, match="finetune, dss"):
        resolve_model(str(run))


def test_a_symlinked_method_directory_keeps_its_run(tmp_path):
    from qcrd_ray.runs import resolve_model

    run = _fake_run(tmp_path / "run")
    store = tmp_path / "elsewhere" / "qcrd"
    store.parent.mkdir()
    (run / "qcrd").rename(store)
    (run / "qcrd").symlink_to(store, target_is_directory=True)
    r = resolve_model(str(run / "qcrd"))
    assert r.run is not None and r.run.root == str(run) and r.config.data.task == "svamp"
    assert r.model_dir == str(run / "qcrd" / "model")


def test_teacher_problem_stops_on_mostly_failed_samples_or_no_positive():
    from qcrd_ray.pipeline import teacher_problem

    base = {"examples": 10, "samples": 30, "backend": "synthetic", "examples_without_positive": 2,
            "teacher_accuracy": 0.8, "status_counts": {"ok": 16, "no_answer": 14, "empty": 0, "request_error": 0}}
    assert teacher_problem(base) is None  # 14 of 30 failed: under half
    failed = {**base, "status_counts": {"ok": 14, "no_answer": 6, "empty": 0, "request_error": 10}}
    assert "16 of 30 teacher samples failed" in teacher_problem(failed)
    assert "request_error 10" in teacher_problem(failed)
    no_positive = {**base, "examples_without_positive": 10}
    assert "no example has a positive" in teacher_problem(no_positive)
    assert "no samples" in teacher_problem({"examples": 0, "samples": 0})


def test_a_teacher_that_cannot_serve_the_task_is_refused_before_anything_starts(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--task", "cqa", "--data", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "teacher.backend: synthetic cannot teach task 'cqa'" in err and "recorded, hf, http, vllm" in err
    assert not out.exists()


def test_report_survives_every_agreement_key_the_teacher_writes(tmp_path):
    """The svamp recorded teacher writes a `none` agreement (no sample answered); the report draws it as its
    own bar after the numeric ones (issue 10.7 a)."""
    from qcrd_ray.config import Config
    from qcrd_ray.report import agreement_bars, write_report
    from qcrd_ray.teacher.summary import summarize

    rows = [{"samples": [{"status": "ok"}], "majority_answer": "3", "agreement": 1.0, "teacher_correct": True,
             "positives": ["r"], "negatives": []},
            {"samples": [{"status": "no_answer"}], "majority_answer": None, "agreement": 0.0,
             "teacher_correct": False, "positives": [], "negatives": ["r"]}]
    summary = summarize(rows)
    assert set(summary["agreement_histogram"]) == {"1.00", "none"}
    assert agreement_bars({"none": 2, "1.00": 3, "0.50": 1}) == [("0.50", 1), ("1.00", 3), ("none", 2)]
    for teacher_summary in (summary, {}, {"agreement_histogram": {"none": 4}}):
        report = write_report(tmp_path / "run", Config(), teacher_summary, {})
        assert "## Teacher" in Path(report).read_text()  # write_report returns a location (path or URI)
    assert (tmp_path / "run" / "figures" / "teacher-agreement.png").stat().st_size > 1000


def test_a_stage_error_survives_copy_and_pickle():
    """Ray and Tune copy and pickle a trial's exception by calling its class with its args: a StageError that could
    not be rebuilt turned a sweep trial's one-line failure into a TypeError about the error itself."""
    import copy
    import pickle

    from qcrd_ray.pipeline import StageError

    error = StageError("train qcrd", "ValueError: boom")
    for again in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert (str(again), again.stage, again.message) == ("train qcrd: ValueError: boom", "train qcrd",
                                                            "ValueError: boom")


def test_a_run_continues_under_other_tracker_names_but_not_under_another_training_config(tmp_path):
    """A trial directory copied into another sweep (which names its tracker runs after itself) is picked up as the
    same run; a config that changes what the outputs are is refused before any stage runs, and so is resuming one
    method's training (`qcrd train` on its own) under another config."""
    from qcrd_ray.config import Config, ConfigError
    from qcrd_ray.runs import RunLayout, check_same_config
    from qcrd_ray.train.trainer import run_training

    layout = RunLayout.at(str(tmp_path / "run"))
    made = Config().replace(train={"experiment": "quality", "run_name": "noise=0.3,method=qcrd,seed=0"})
    check_same_config(layout.config, made, layout.root)  # writes config.yaml
    check_same_config(layout.config, made.replace(train={"experiment": "cost", "run_name": "variant=default,seed=0",
                                                         "method": "dss"}), layout.root)
    with pytest.raises(ConfigError, match=r"run was made with a different config \(train\.seed differ\)"):
        check_same_config(layout.config, made.replace(train={"seed": 1}), layout.root)
    method = layout.method("qcrd")
    check_same_config(method.train_config, made, method.root)  # what a first `qcrd train` writes
    with pytest.raises(ConfigError, match=r"loss\.beta"):  # refused before any checkpoint is read or Ray started
        run_training(made.replace(loss={"beta": 0.5}), tmp_path / "no-teacher", method.root)
