"""Every `qcrd` command the README shows, so the README cannot rot (issue 10 item 7).

Each command is taken from the README text itself. All of them must parse and resolve to a valid config that
`qcrd run` would accept; the Real data commands run for real on the shared benchmark data (``datasets`` in the
README) at tiny sizes (``--set`` overrides appended, ``--out`` in tmp_path). Commands that need the model hub, a
GPU or a cluster (Real models, On a cluster) are checked up to their config only.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from qcrd_ray.cli import build_parser, load_config_from_args, main

README = Path(__file__).parents[1] / "README.md"


def readme_commands(text: str | None = None) -> list[list[str]]:
    """The `qcrd ...` commands of the README (or of a part of it) as argv lists, continuation lines joined,
    comments and `&&` chains cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text or README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.split("  #")[0].strip()
                if part.startswith("qcrd "):
                    commands.append(shlex.split(part)[1:])
    return commands


# tiny sizes: a few rows, one short round per method, a small student
TINY = [
    "--set", "data.max_rows=40", "--set", "train.rounds=1", "--set", "train.round_steps=2",
    "--set", "train.batch_size=4", "--set", "snapshots.j=1", "--set", "snapshots.max_new_tokens=16",
    "--set", "discriminator.pretrain_steps=2", "--set", "discriminator.refresh_steps=1",
    "--set", "student.max_target_len=32", "--set", "student.tiny_d_model=32", "--set", "student.tiny_d_ff=64",
    "--set", "student.tiny_layers=1", "--set", "student.tiny_vocab_size=400",
    "--set", "train.num_workers=1",  # one rank: DDP is tested elsewhere; here the commands are under test
]


def _with_data(argv: list[str], data: Path) -> list[str]:
    return [str(data) if a == "datasets" else a for a in argv]


def test_readme_shows_the_commands_this_file_runs():
    commands = readme_commands()
    assert ["run"] in commands  # the set-up command
    assert sum(c[0] == "run" and "datasets" in c for c in commands) >= 2  # the Real data runs
    assert any(c[0] == "eval" for c in commands) and any(c[0] == "serve" for c in commands)


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses_to_a_runnable_config(argv, tmp_path):
    """Flags, config files and `--set` keys the README shows exist, and `qcrd run` would accept the config."""
    from qcrd_ray.pipeline import check_runnable

    argv = _with_data(argv, tmp_path)
    args = build_parser(load_subcommands=argv[0]).parse_args(argv)
    if argv[0] in ("run", "teach"):
        cfg = load_config_from_args(args, data="data.data_dir", task="data.task")
        methods = tuple(args.methods.split(",")) if getattr(args, "methods", None) else (cfg.train.method,)
        check_runnable(cfg, methods)


@pytest.mark.slow
def test_real_data_commands_run_end_to_end(ray_session, shared_data, tmp_path, monkeypatch, capsys):
    """The "Real data" block in order, from a scratch working directory (its runs/ land there): inspect, the
    svamp recorded run, `qcrd eval` of the run it made, the cqa comparison of three methods."""
    monkeypatch.chdir(tmp_path)
    block = README.read_text().split("## Real data", 1)[1].split("\n## ", 1)[0]
    commands = readme_commands(block)
    assert [c[0] for c in commands] == ["data", "run", "eval", "run"]
    config = Path(__file__).parents[1] / "configs"
    for argv in commands:
        argv = [str(config.parent / a) if a.startswith("configs/") else a for a in _with_data(argv, shared_data)]
        extra = TINY if argv[0] == "run" else []
        assert main([*argv, *extra]) == 0, f"README command failed: qcrd {' '.join(argv)}"
    printed = capsys.readouterr().out
    assert "svamp / train:" in printed and "serve it: qcrd serve --model" in printed
    for method in ("finetune", "dss", "qcrd"):
        assert (tmp_path / "runs" / "cqa" / method / "model" / "config.json").is_file()
    report = (tmp_path / "runs" / "cqa" / "report.md").read_text()
    assert "| qcrd |" in report and (tmp_path / "runs" / "cqa" / "figures" / "teacher-agreement.png").is_file()
    explain = json.loads((tmp_path / "runs" / "svamp" / "qcrd" / "eval" / "valid-explain" / "metrics.json").read_text())
    assert explain["task"] == "svamp" and explain["n"] > 0
