"""Multi-teacher mixing (teacher.sources): which source draws which samples, validation, the manifest and the
per-source statistics (pure), then two real Ray Data runs: two synthetic teachers at different noise levels, and the
recorded backend mixed with the synthetic one on a small svamp dataset with recorded rationales."""

from __future__ import annotations

import json

import pytest

from qcrd_ray.config import Config, ConfigError, load_config
from qcrd_ray.data.tasks import get_task
from qcrd_ray.teacher.backends import BACKENDS
from qcrd_ray.teacher.backends.synthetic import synthetic_output
from qcrd_ray.teacher.pipeline import iter_teacher_rows, run_teacher
from qcrd_ray.teacher.samples import sample_seed
from qcrd_ray.teacher.shards import check_manifest, manifest
from qcrd_ray.teacher.sources import check_teacher, resolve_sources, sample_counts
from qcrd_ray.teacher.summary import format_table, summarize

TWO_NOISES = [{"name": "clean", "noise": 0.05}, {"name": "noisy", "noise": 0.6, "weight": 1}]


def _mix(n: int, sources, k: int = 4, **data) -> Config:
    return Config().replace(data={"synthetic_train_size": n, **data},
                            teacher={"k": k, "shard_rows": 8, "batch_size": 8, "max_actors": 1, "sources": sources})


# ---------------------------------------------------------------------------------------------------- pure


def test_weights_split_the_k_samples_by_largest_remainder_in_contiguous_blocks():
    assert sample_counts(4, [1, 1]) == [2, 2]
    assert sample_counts(5, [1, 1]) == [3, 2]  # a tie goes to the source listed first
    assert sample_counts(5, [1, 3]) == [1, 4]  # 1.25 / 3.75: the larger remainder gets the fifth
    assert sample_counts(6, [0.2, 0.3, 0.5]) == [1, 2, 3]
    assert sum(sample_counts(7, [0.1, 0.45, 0.45])) == 7
    sources = resolve_sources(_mix(4, [{"name": "a", "weight": 3}, {"name": "b", "weight": 2, "noise": 0.5}], k=5))
    assert [(s.name, s.indices) for s in sources] == [("a", (0, 1, 2)), ("b", (3, 4))]
    # each source's settings: the top-level keys, overridden by its own; teacher.k is its share
    assert [s.cfg.teacher.noise for s in sources] == [None, 0.5] and [s.cfg.teacher.k for s in sources] == [3, 2]
    assert all(s.cfg.teacher.sources == () and s.backend is BACKENDS["synthetic"] for s in sources)


def test_a_single_teacher_config_is_one_source_and_unchanged():
    cfg = Config()
    [source] = resolve_sources(cfg)
    assert source.cfg is cfg and source.indices == tuple(range(cfg.teacher.k)) and source.name == "synthetic"
    assert "sources" not in manifest(cfg, "train", ["a"])["teacher"]


@pytest.mark.parametrize("sources, match", [
    ([{"name": "a", "k": 2}], r"teacher.sources\[0\].k: set for the whole teacher output"),
    ([{"name": "a"}, {"name": "a"}], r"teacher.sources\[1\].name: 'a' names two sources"),
    ([{"backend": "hf"}], r"teacher.sources\[0\].name: required"),
    ([{"name": "a", "weight": 0}], r"teacher.sources\[0\].weight: a number > 0"),
    ([{"name": "a", "noise": 2.0}], r"teacher.sources\[0\] \(a\): teacher.noise: 2.0 is out of range"),
    ([{"name": "a", "weight": 9}, {"name": "b"}], r"teacher.sources\[1\] \(b\): weight 1 gets none of the "
                                                  r"teacher.k=4 samples"),
    ([{"name": "a", "backend": "hf"}], r"teacher.sources\[0\] \(a\): the hf backend needs a model"),
    ([{"name": "a"}, {"name": "b", "backend": "recorded"}], r"draws exactly 1 sample\(s\) per question, not 2; it "
                                                            r"draws 2 of the K=4"),
    ([{"name": "a", "backend": "gpt"}], r"unknown teacher backend 'gpt'"),
])
def test_bad_sources_are_refused_naming_the_entry(sources, match):
    with pytest.raises(ConfigError, match=match):
        _mix(4, sources)


def test_sources_load_from_yaml_and_round_trip(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text("teacher:\n  k: 5\n  sources:\n    - {name: palm, backend: recorded, weight: 1}\n"
                    "    - {name: rules, backend: synthetic, weight: 4, temperature: 1.0}\n")
    cfg = load_config(path)
    assert [(s.name, s.backend.name, s.indices) for s in resolve_sources(cfg)] == [
        ("palm", "recorded", (0,)), ("rules", "synthetic", (1, 2, 3, 4))]
    assert load_config(overrides=[f"teacher.sources={json.dumps(list(cfg.teacher.sources))}",
                                  "teacher.k=5"]) == cfg == Config().replace(**cfg.to_dict())
    with pytest.raises(ConfigError, match=r"teacher.sources\[0\].backend: synthetic cannot teach task 'cqa'"):
        check_teacher(cfg.replace(data={"task": "cqa"}, teacher={"sources": [{"name": "r"}], "k": 1}))
    check_teacher(cfg.replace(data={"task": "svamp"}))  # both serve numeric tasks


def test_the_manifest_pins_each_source_so_a_resume_with_other_sources_is_refused(tmp_path):
    cfg = _mix(4, TWO_NOISES)
    pinned = manifest(cfg, "train", ["a", "b"])
    assert [(s["name"], s["samples"], s["noise"]) for s in pinned["teacher"]["sources"]] == [
        ("clean", [0, 1], 0.05), ("noisy", [2, 3], 0.6)]
    check_manifest(tmp_path, pinned)
    check_manifest(tmp_path, manifest(cfg.replace(teacher={"batch_size": 4}), "train", ["a", "b"]))  # pool: same
    for other in ([{**TWO_NOISES[0]}, {**TWO_NOISES[1], "noise": 0.5}],
                  [{**TWO_NOISES[0], "weight": 3}, TWO_NOISES[1]]):
        with pytest.raises(ConfigError, match="teacher.sources differ"):
            check_manifest(tmp_path, manifest(_mix(4, other), "train", ["a", "b"]))


def _sample(index, answer, rationale, status="ok"):
    return {"index": index, "answer": answer, "rationale": rationale, "status": status, "text": "", "error": ""}


def test_per_source_statistics_credit_each_source_with_its_own_samples():
    cfg = _mix(4, TWO_NOISES)
    row = {"id": "a", "task": "synthetic", "choices": [], "label": "( 5.0 + 3.0 )", "majority_answer": "8",
           "agreement": 2 / 3, "teacher_correct": True, "positives": ["r0", "r2"], "negatives": ["r3"],
           "samples": [_sample(0, "8", "r0"), _sample(1, None, "", "no_answer"),  # clean: samples 0, 1
                       _sample(2, "( 5 + 3 )", "r2"), _sample(3, "9", "r3")]}  # noisy: samples 2, 3
    summary = summarize([row, row], (resolve_sources(cfg), get_task("synthetic")))
    clean, noisy = summary["sources"]
    assert clean == {"name": "clean", "backend": "synthetic", "weight": 1.0, "samples_per_question": 2, "samples": 4,
                     "agreement_with_gold": 1.0, "agreement_with_majority": 1.0, "error_rate": 0.5,
                     "positive_share": 0.5}
    assert (noisy["agreement_with_gold"], noisy["agreement_with_majority"], noisy["error_rate"],
            noisy["positive_share"]) == (0.5, 0.5, 0.0, 0.5)
    assert "source noisy (synthetic, 2 of K)" in format_table(summary)
    assert "sources" not in summarize([row])  # a single teacher's summary is as it was


# ---------------------------------------------------------------------------------------------------- Ray Data


def test_two_synthetic_teachers_at_different_noise_levels(ray_session, tmp_path):
    cfg = _mix(24, TWO_NOISES)
    summary = run_teacher(cfg, tmp_path)
    rows = list(iter_teacher_rows(tmp_path))
    assert [r["id"] for r in rows] == [f"synthetic-train-{i}" for i in range(24)]
    assert all([s["index"] for s in r["samples"]] == [0, 1, 2, 3] for r in rows)  # the union of both, in order
    clean, noisy = summary["sources"]
    assert (clean["samples"], noisy["samples"]) == (48, 48)
    # the noisier teacher agrees less with gold, errs more and contributes fewer of the positives
    assert clean["agreement_with_gold"] > noisy["agreement_with_gold"]
    assert clean["error_rate"] <= noisy["error_rate"] and clean["positive_share"] > noisy["positive_share"]
    assert summary["backend"] == "synthetic" and summary["samples"] == 96
    # each source draws what that teacher alone draws for those sample indices: its own settings, the same seeds
    for row in rows:
        for s in row["samples"]:
            noise = 0.05 if s["index"] < 2 else 0.6
            assert s["text"] == synthetic_output(row["label"], sample_seed(0, row["id"], s["index"]), 0.7, row["id"],
                                                 noise)
    assert json.loads((tmp_path / "summary.json").read_text())["sources"] == summary["sources"]


def _svamp_with_recorded_rationales(root, n):
    """A DSS-layout svamp train split with one recorded PaLM-style rationale per row, every third one wrong."""
    rows = [{"input": f"Tom has {i} apples. He buys 2 more. How many apples does he have?",
             "label": f"( {i}.0 + 2.0 )"} for i in range(n)]
    cots = [f"Tom starts with {i} apples and buys 2 more. {i} + 2 = {i + 2 + (i % 3 == 0)}. "
            f"So the answer is {i + 2 + (i % 3 == 0)}.\n\nQ: the next exemplar" for i in range(n)]
    (root / "svamp" / "llm").mkdir(parents=True)
    (root / "svamp" / "svamp_train.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "svamp" / "llm" / "train_CoT_0.json").write_text(json.dumps(cots))


def test_recorded_and_synthetic_teachers_mixed(ray_session, tmp_path):
    _svamp_with_recorded_rationales(tmp_path / "data", 18)
    cfg = Config().replace(
        data={"data_dir": str(tmp_path / "data"), "task": "svamp", "valid_fraction": 0.0},
        teacher={"k": 3, "shard_rows": 8, "batch_size": 6, "max_actors": 1, "noise": 0.3, "sources": [
            {"name": "palm", "backend": "recorded", "weight": 1}, {"name": "rules", "weight": 2}]})
    check_teacher(cfg)
    out = tmp_path / "teacher"
    summary = run_teacher(cfg, out)
    rows = list(iter_teacher_rows(out))
    assert len(rows) == 18 and summary["backend"] == "recorded, synthetic"
    for i, row in enumerate(sorted(rows, key=lambda r: int(r["id"].rsplit("-", 1)[1]))):
        recorded, *rules = row["samples"]
        assert recorded["index"] == 0 and recorded["text"].startswith(f"Tom starts with {i} apples")  # replayed
        assert "Q: the next exemplar" not in recorded["rationale"]  # parsed as recorded CoT: the tail is cut
        assert [s["index"] for s in rules] == [1, 2] and all(s["text"].startswith("<Explanation>:") for s in rules)
    palm, rules = summary["sources"]
    assert (palm["samples_per_question"], rules["samples_per_question"]) == (1, 2)
    assert palm["agreement_with_gold"] == pytest.approx(12 / 18)  # every third recorded rationale is wrong
    assert palm["error_rate"] == 0.0 and palm["positive_share"] + rules["positive_share"] == pytest.approx(1.0)
    # a resume with other sources is refused rather than mixed
    with pytest.raises(ConfigError, match="teacher.sources differ"):
        run_teacher(cfg.replace(teacher={"sources": [{"name": "palm", "backend": "recorded"},
                                                     {"name": "rules", "weight": 2, "noise": 0.1}]}), out)


def test_the_readme_mix_is_a_valid_config():
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "sources:" in b)
    cfg = Config().replace(**yaml.safe_load(block))
    assert [(s.name, s.backend.name, len(s.indices)) for s in resolve_sources(cfg)] == [("palm", "recorded", 1),
                                                                                         ("gpt", "http", 4)]


def test_the_report_shows_each_source(tmp_path):
    from qcrd_ray.report import write_report

    cfg = _mix(4, TWO_NOISES)
    stats = {"name": "clean", "backend": "synthetic", "samples_per_question": 2, "agreement_with_gold": 0.9,
             "agreement_with_majority": 0.95, "error_rate": 0.05, "positive_share": 0.7}
    summary = {"examples": 4, "sources": [stats, {**stats, "name": "noisy", "agreement_with_gold": 0.4}]}
    text = (tmp_path / "run" / "report.md").read_text() if write_report(tmp_path / "run", cfg, summary, {}) else ""
    assert "Teacher: a mix of sources, K = 4: clean = `synthetic` at T = 0.7 (2 of K), noisy" in text
    assert "| clean | synthetic | 2 | 90.0% | 95.0% | 5.0% | 70.0% |" in text and "| noisy | synthetic | 2 | 40.0%" in text
