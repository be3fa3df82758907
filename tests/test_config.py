import pytest
import yaml

from qcrd_ray.cli import main
from qcrd_ray.config import Config, ConfigError, load_config, parse_override


def test_defaults_are_the_papers():
    cfg = load_config()
    assert (cfg.loss.alpha1, cfg.loss.alpha2, cfg.loss.alpha3, cfg.loss.beta, cfg.loss.delta) == (0.5, 0.5, 0.5, 0.2, 3.0)
    assert (cfg.teacher.k, cfg.teacher.temperature, cfg.snapshots.j, cfg.snapshots.temperature) == (5, 0.7, 5, 1.5)
    assert cfg.discriminator.pretrain_steps == 500 and cfg.loss.alpha3_decay == 0.9
    assert cfg.data.task == "synthetic" and cfg.data.data_dir is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("bogus.key=1", "unknown section 'bogus'"),
        ("train.bogus=1", "unknown key train.bogus; allowed keys in 'train'"),
        ("train.rounds=many", "train.rounds: expected an integer"),
        ("train.rounds=1.5", "train.rounds: expected an integer"),
        ("train.rounds=0", "train.rounds: 0 is out of range; must be >= 1"),
        ("data.valid_fraction=0.9", "data.valid_fraction: 0.9 is out of range; must be <= 0.5"),
        ("teacher.temperature=-1", "teacher.temperature: -1.0 is out of range; must be >= 0.0"),
        ("train.method=magic", "train.method: 'magic' is not allowed; choose one of finetune, dss, qcrd"),
        ("loss.quality_judge=maybe", "loss.quality_judge: expected true/false"),
        ("data.columns=3", "data.columns: expected a mapping"),
        ("teacher.stop=[Q:]", "teacher.stop: expected a list of strings"),
        ("train.rounds", "expected section.key=value"),
        ("rounds=3", "expected section.key=value"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(overrides=[override])


def test_overrides_are_typed_and_applied_last(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"rounds": 3, "lr": 1}, "loss": {"quality_judge": "off"}}))
    cfg = load_config(path, ["train.rounds=4", "data.columns={input: q, label: a}", "teacher.stop=['Q:']"])
    assert cfg.train.rounds == 4  # --set wins over the file
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.loss.quality_judge is False
    assert cfg.data.columns == {"input": "q", "label": "a"}
    assert cfg.teacher.stop == ("Q:",)
    assert load_config(overrides=["loss.quality_judge=on"]).loss.quality_judge is True
    assert load_config(overrides=["data.max_rows=null"]).data.max_rows is None


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listy)
    wrong_section = tmp_path / "section.yaml"
    wrong_section.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(wrong_section)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("student:\n  size: big\n")
    with pytest.raises(ConfigError, match="unknown key student.size"):
        load_config(unknown)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="min_actors"):
        load_config(overrides=["teacher.min_actors=3", "teacher.max_actors=2"])
    with pytest.raises(ConfigError, match="teacher.k"):
        load_config(overrides=["teacher.backend=recorded"])
    with pytest.raises(ConfigError, match="teacher.model"):
        load_config(overrides=["teacher.backend=hf"])


def test_frozen_and_replace_validates():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.train.rounds = 3  # type: ignore[misc]
    assert cfg.replace(train={"rounds": 2}).train.rounds == 2
    with pytest.raises(ConfigError):
        cfg.replace(train={"rounds": -1})


def test_yaml_round_trip_and_show(tmp_path, capsys):
    cfg = load_config(overrides=["train.rounds=7", "data.task=svamp"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert main(["config", "show", "--set", "train.rounds=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["rounds"] == 7
    assert main(["config", "show", "--set", "train.rounds=0"]) == 2
    assert "train.rounds" in capsys.readouterr().err


def test_parse_override_values_are_yaml():
    assert load_config(overrides=["train.lr=5e-4"]).train.lr == 5e-4  # YAML 1.1 alone reads "5e-4" as a string
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(overrides=["train.rounds=1e3"])
    assert parse_override("train.rounds=3") == (["train", "rounds"], 3)
    assert parse_override("data.data_dir=/x/y") == (["data", "data_dir"], "/x/y")
    assert parse_override("data.data_dir=") == (["data", "data_dir"], "")


def _all_fields(cls, prefix=""):
    """(dotted key, field) of every field of ``cls``, recursively (the sections, student.lora and its keys)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _all_fields(hints[f.name], f"{prefix}{f.name}.")


def test_every_key_has_a_one_line_help():
    keys = dict(_all_fields(Config))
    assert "student.lora.r" in keys and "train.lr" in keys and "serve" in keys
    for key, f in keys.items():
        text = f.metadata.get("help")
        assert isinstance(text, str) and text.strip(), f"{key}: no help"
        assert "\n" not in text and text == text.strip(), f"{key}: help is not one line: {text!r}"


def test_config_explain(capsys):
    assert main(["config", "explain", "train.lr"]) == 0
    out = capsys.readouterr().out
    assert out.split()[:4] == ["train.lr", "0.003", "float", ">="]
    assert "learning rate" in out and "train.rounds" not in out
    assert main(["config", "explain", "student.lora"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("student.lora: ")
    for key, default in [("r", "0"), ("alpha", "16.0"), ("dropout", "0.0"), ("target_modules", "[]")]:
        assert f"student.lora.{key}" in out and default in out
    assert "0 = LoRA off" in out and "student.model" not in out
    assert main(["config", "explain", "loss.scheme"]) == 0
    assert "minmax | maxmin | sampling | mean | wmean" in capsys.readouterr().out
    assert main(["config", "explain"]) == 0
    out = capsys.readouterr().out
    assert all(key in out for key in dict(_all_fields(Config)))  # every section, group and key
    for argv, message in [
        (["train.bogus"], "unknown key train.bogus; allowed keys in 'train': batch_size,"),
        (["student.lora.rank"], "unknown key student.lora.rank; allowed keys in 'student.lora': alpha, dropout, r,"),
        (["bogus"], "unknown section 'bogus'; allowed sections: data, teacher,"),
        (["train.lr.x"], "unknown key train.lr.x; train.lr is a key, not a section"),
    ]:
        assert main(["config", "explain", *argv]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and not captured.out
