"""Same config and seed, same result: `qcrd run` twice on CPU (teacher, 2 DDP workers, QCRD with its negative
samplers and discriminator, eval) into two run folders gives identical teacher shards, weights and predictions."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from qcrd_ray.cli import main
from test_pipeline import SMALL

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _run(out) -> None:
    assert main(["run", "--out", str(out), "--methods", "qcrd", *SMALL, "--set", "train.seed=3"]) == 0


def _tensors(path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def test_two_runs_with_one_seed_are_identical(ray_session, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a)
    _run(b)

    shards = sorted(p.relative_to(a) for p in (a / "teacher").rglob("*.parquet"))
    assert shards and shards == sorted(p.relative_to(b) for p in (b / "teacher").rglob("*.parquet"))
    for shard in shards:
        ta, tb = pq.read_table(a / shard), pq.read_table(b / shard)
        assert ta.num_rows > 0 and ta.equals(tb), shard

    wa, wb = _tensors(a / "qcrd" / "model"), _tensors(b / "qcrd" / "model")
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not (wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape
                                      and bool((wa[k] == wb[k]).all()))]
    assert not different, different  # bit-identical, not merely close
    assert (a / "qcrd" / "model" / "tokenizer.json").read_bytes() == (b / "qcrd" / "model" / "tokenizer.json").read_bytes()

    # the student's negatives of each round (what the samplers wrote, whenever they wrote it)
    negatives = [sorted((a_or_b / "qcrd" / "train" / "negatives.jsonl").read_text().splitlines()) for a_or_b in (a, b)]
    assert negatives[0] and negatives[0] == negatives[1]

    for mode in ("predict", "explain"):
        ea, eb = a / "qcrd" / "eval" / f"test-{mode}", b / "qcrd" / "eval" / f"test-{mode}"
        ma, mb = (json.loads((e / "metrics.json").read_text()) for e in (ea, eb))
        assert ma.pop("model") != mb.pop("model")  # each names its own run's model folder; the rest must agree
        assert ma["n"] > 0 and ma == mb, mode
        assert (ea / "predictions.jsonl").read_text() == (eb / "predictions.jsonl").read_text(), mode
