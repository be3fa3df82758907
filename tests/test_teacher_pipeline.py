"""The teacher stage end to end on the session Ray: synthetic and hf backends, the CLI, resumption after an
interruption, and the recorded backend on the shared svamp data."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from qcrd_ray import storage
from qcrd_ray.cli import main as qcrd
from qcrd_ray.config import Config, StudentConfig, from_dict
from qcrd_ray.data.loaders import load_split
from qcrd_ray.data.schema import TEACHER_SCHEMA
from qcrd_ray.students import load_student, save_student
from qcrd_ray.students.tokenizer import train_tokenizer
from qcrd_ray.teacher.backends.hf import HFBackend
from qcrd_ray.teacher.pipeline import MAX_INPUT_BLOCKS, error_records, input_blocks, iter_teacher_rows, run_teacher
from qcrd_ray.teacher.shards import plan_shards
from qcrd_ray.teacher.summary import summarize
from qcrd_ray.testing import patience


def _synthetic(n: int, **teacher) -> Config:
    return Config().replace(data={"synthetic_train_size": n}, teacher={"k": 4, "shard_rows": 6, "batch_size": 8, **teacher})


def _shards(out):
    return {p.name: pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))}


def test_cli_synthetic_end_to_end(ray_session, tmp_path, capsys):
    out = tmp_path / "teacher"
    code = qcrd(["teach", "--task", "synthetic", "--out", str(out), "--set", "data.synthetic_train_size=20",
                 "--set", "teacher.k=4", "--set", "teacher.shard_rows=6", "--set", "teacher.batch_size=8"])
    assert code == 0
    assert "teacher accuracy vs gold" in capsys.readouterr().out
    rows = list(iter_teacher_rows(out))
    assert [r["id"] for r in rows] == [f"synthetic-train-{i}" for i in range(20)]  # none lost, none twice, in order
    assert all(t.schema.equals(TEACHER_SCHEMA) for t in _shards(out).values()) and len(_shards(out)) == 4
    assert all([s["index"] for s in r["samples"]] == [0, 1, 2, 3] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert {k: summary[k] for k in summarize(rows)} == json.loads(json.dumps(summarize(rows)))
    assert summary["examples"] == 20 and summary["samples"] == 80 and summary["request_failures"] == 0
    # the noisy teacher gives self-consistency real work: wrong samples, negatives, and not-unanimous votes
    assert summary["parse_failures"] > 0 and summary["negatives_per_example"] > 0
    assert summary["mean_agreement"] < 1.0 and summary["teacher_accuracy"] >= 0.5
    for r in rows:  # positives are the rationales of the samples that gave the majority answer
        majority = {x["rationale"] for x in r["samples"] if x["answer"] == r["majority_answer"]}
        assert set(r["positives"]) <= majority and (r["majority_answer"] is None or r["positives"])
    assert from_dict(yaml.safe_load((out / "config.yaml").read_text())).teacher.k == 4
    assert (out / "rejects.jsonl").read_text() == ""
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert errors == [e for r in rows for e in error_records(r)]  # every failed sample once, in shard order
    assert len(errors) == summary["samples"] - summary["status_counts"]["ok"] > 0


@pytest.mark.parametrize("examples", [600, 6000, 60_000])
def test_input_blocks_cover_the_split_once_and_their_number_is_capped(examples):
    shards = plan_shards(examples, 256, "out")
    blocks = input_blocks(shards, batch_size=16, k=5)
    covered = [i for _, start, stop in blocks for i in range(start, stop)]
    assert covered == list(range(examples))  # every example once, in order
    assert all(shards[s].start <= start < stop <= shards[s].stop for s, start, stop in blocks)  # within its shard
    if examples == 600:  # a small split: one teacher batch (16 samples) per block, 4 examples x K=5
        assert {stop - start for _, start, stop in blocks} == {4}
    # the driver's Ray Data state grows with the number of blocks, not with the split
    assert len(blocks) <= MAX_INPUT_BLOCKS + len(shards)


class Interrupt(Exception):
    pass


def test_teacher_finishes_while_other_work_holds_all_but_one_cpu(ray_session, tmp_path):
    """Two sweep trials teaching at once left under one CPU free: a stage asking for a whole CPU never ran."""
    import threading

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    busy = ray.available_resources().get("CPU", 0.0) - 1.0
    held = placement_group([{"CPU": busy}]) if busy > 0 else None
    if held is not None:
        ray.get(held.ready(), timeout=patience(60))
    done: list = []
    thread = threading.Thread(target=lambda: done.append(run_teacher(_synthetic(12), tmp_path / "t")), daemon=True)
    thread.start()
    thread.join(120)
    if held is not None:
        remove_placement_group(held)
    assert done and done[0]["examples"] == 12, "the teacher stage hung with one CPU free"


def test_interrupted_run_resumes_to_the_uninterrupted_result(ray_session, tmp_path):
    cfg = _synthetic(22, shard_rows=5)  # 5 shards, the last one short
    full = tmp_path / "full"
    run_teacher(cfg, full)

    part = tmp_path / "part"
    written = []

    def crash_after_two(shard, table):
        written.append(shard.index)
        if len(written) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_teacher(cfg, part, on_shard=crash_after_two)
    assert len(_shards(part)) == 2
    (part / ".part-00004.parquet.tmp-999").write_bytes(b"torn write of a killed run")
    finished = {name: (part / name).stat().st_mtime_ns for name in _shards(part)}

    resumed = []
    summary = run_teacher(cfg, part, on_shard=lambda shard, table: resumed.append(shard.index))
    assert sorted(resumed) == sorted(set(range(5)) - set(written))  # only the missing shards ran
    assert {name: (part / name).stat().st_mtime_ns for name in finished} == finished
    assert not list(part.glob(".part-*"))
    a, b = _shards(full), _shards(part)
    assert a.keys() == b.keys() and all(a[name].equals(b[name]) for name in a)
    ids = [r["id"] for r in iter_teacher_rows(part)]
    assert len(ids) == len(set(ids)) == 22 and summary["examples"] == 22
    assert json.loads((full / "summary.json").read_text()) == json.loads((part / "summary.json").read_text())
    assert (full / "errors.jsonl").read_text() == (part / "errors.jsonl").read_text() != ""  # none lost or twice

    # a finished folder is not regenerated; a different teacher setting is refused instead of mixed in
    rerun = []
    run_teacher(cfg, part, on_shard=lambda shard, table: rerun.append(shard))
    assert rerun == []
    from qcrd_ray.config import ConfigError

    with pytest.raises(ConfigError, match="teacher.temperature"):
        run_teacher(cfg.replace(teacher={"temperature": 1.2}), part)


def test_teacher_output_on_s3_streams_shards_and_resumes_from_the_uri(ray_session, s3_server, tmp_path, monkeypatch):
    cfg = _synthetic(14, shard_rows=5)  # 3 shards, the last one short
    local = tmp_path / "local"
    local_summary = run_teacher(cfg, local)
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    monkeypatch.chdir(scratch)  # the driver's working directory must hold nothing of the run
    out = storage.join(s3_server, "teach-resume", "teacher")

    stored = []

    def crash_after_one(shard, table):
        stored.append(sorted(storage.basename(p) for p in storage.list_files(out, "part-*")))
        raise Interrupt

    with pytest.raises(Interrupt):
        run_teacher(cfg, out, on_shard=crash_after_one)
    assert len(stored[0]) == 1  # the shard was in the bucket before the hook ran, not buffered to the end
    assert json.loads(storage.read_text(storage.join(out, "manifest.json")))["examples"] == 14

    resumed = []
    summary = run_teacher(cfg, out, on_shard=lambda shard, table: resumed.append(storage.basename(shard.path)))
    assert sorted(resumed + stored[0]) == [f"part-{i:05d}.parquet" for i in range(3)]  # only the missing ones ran
    names = [storage.basename(p) for p in storage.list_files(out)]
    assert names == ["config.yaml", "errors.jsonl", "manifest.json", "part-00000.parquet", "part-00001.parquet",
                     "part-00002.parquet", "rejects.jsonl", "summary.json"]
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):
        assert storage.read_parquet(storage.join(out, name)).equals(pq.read_table(local / name))
    assert summary == local_summary == json.loads(storage.read_text(storage.join(out, "summary.json")))
    assert storage.read_text(storage.join(out, "errors.jsonl")) == (local / "errors.jsonl").read_text() != ""
    assert [r["id"] for r in iter_teacher_rows(out)] == [f"synthetic-train-{i}" for i in range(14)]
    assert list(scratch.iterdir()) == []


def test_recorded_backend_on_shared_svamp(ray_session, shared_data, tmp_path):
    cfg = Config().replace(
        data={"data_dir": str(shared_data), "task": "svamp", "max_rows": 40},
        teacher={"backend": "recorded", "k": 1, "shard_rows": 16, "batch_size": 8},
    )
    summary = run_teacher(cfg, tmp_path)
    rows = list(iter_teacher_rows(tmp_path))
    expected = load_split(cfg.data, "train").rows
    assert [r["id"] for r in rows] == [e["id"] for e in expected]
    assert summary["samples"] == summary["examples"] == len(expected) and summary["request_failures"] == 0
    for row, example in zip(rows, expected):
        assert row["samples"][0]["text"] == example["rationales"][0]  # replayed verbatim
        assert all("\n\nQ:" not in p for p in row["positives"])  # the few-shot tail is cut
        if row["positives"]:
            assert row["agreement"] == 1.0 and row["negatives"] == []
    # PaLM agrees with gold on 66-77 % of the data (shared/data README)
    assert 0.5 <= summary["teacher_accuracy"] <= 0.95
    assert summary["status_counts"]["ok"] >= 0.9 * len(expected)


# ---------------------------------------------------------------------------------------------------- hf


TEXTS = [f"Question: {a} plus {b} is what number? <Explanation>: add them. <Answer>: {a + b}"
         for a in range(10) for b in range(10)]


@pytest.fixture(scope="module")
def tiny_causal(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    tok = train_tokenizer(TEXTS, 120)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=96, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_seq2seq(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    model, tok = load_student(StudentConfig(tiny_vocab_size=120, tiny_d_model=32, tiny_d_ff=64, tiny_layers=1), TEXTS)
    save_student(model, tok, path)
    return path


def _rows(prompts, seeds):
    return [{"prompt": p, "seed": s} for p, s in zip(prompts, seeds)]


@pytest.mark.parametrize("model", ["tiny_causal", "tiny_seq2seq"])
def test_hf_backend_samples_per_row_seeds(model, request):
    path = request.getfixturevalue(model)
    backend = HFBackend(Config().replace(teacher={"backend": "hf", "model": str(path), "max_tokens": 12,
                                                  "temperature": 1.0}))
    prompts = ["Question: 3 plus 4 is what number?"] * 4
    first = [c.text for c in backend.complete(_rows(prompts, [1, 2, 3, 4]))]
    again = [c.text for c in backend.complete(_rows(prompts, [1, 2, 3, 4]))]
    assert first == again  # a sample is a function of its seed
    assert len(set(first)) > 1  # same prompt, different seeds: different samples
    greedy = HFBackend(Config().replace(teacher={"backend": "hf", "model": str(path), "max_tokens": 12,
                                                 "temperature": 0.0}))
    texts = [c.text for c in greedy.complete(_rows(prompts[:2], [1, 2]))]
    assert texts[0] == texts[1]  # temperature 0 is greedy: seeds do not matter


def test_hf_pipeline_end_to_end_turns_garbage_into_parse_failures(ray_session, tiny_seq2seq, tmp_path):
    cfg = _synthetic(6, backend="hf", model=str(tiny_seq2seq), k=2, max_tokens=10, shard_rows=3, batch_size=4,
                     max_actors=2)
    summary = run_teacher(cfg, tmp_path)
    rows = list(iter_teacher_rows(tmp_path))
    assert len(rows) == 6 and all(len(r["samples"]) == 2 for r in rows)
    assert summary["request_failures"] == 0
    # a random model does not write <Answer>: every sample is recorded as a parse failure, none is dropped
    assert summary["parse_failures"] + summary["status_counts"]["ok"] == 12
    errors = (tmp_path / "errors.jsonl").read_text().splitlines()
    assert len(errors) == summary["parse_failures"] > 0
    assert all(s["text"] or s["status"] == "empty" for r in rows for s in r["samples"])
