"""cluster.yaml is a valid Ray cluster-launcher config and offers every resource the shipped configs ask for."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from qcrd_ray.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
CPU_CONFIGS = sorted((ROOT / "configs" / "cpu").glob("*.yaml"))


def stage_demands(cfg: Config) -> dict[str, tuple[dict[str, float], int]]:
    """Per Ray role: (resources of one actor/worker, how many at most)."""
    t, s, tr, sv = cfg.teacher, cfg.snapshots, cfg.train, cfg.serve
    return {
        "teacher actor": ({"CPU": t.num_cpus, "GPU": t.num_gpus}, t.max_actors),
        "train worker": ({"CPU": tr.num_cpus_per_worker, "GPU": 1.0 if tr.use_gpu else 0.0}, tr.num_workers),
        "negative sampler": ({"CPU": s.sampler_num_cpus, "GPU": s.sampler_num_gpus}, s.sampler_actors),
        "serve replica": ({"CPU": sv.num_cpus}, sv.max_replicas),
    }


def fits(bundle: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(k, 0) >= v for k, v in bundle.items() if v > 0)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_a_valid_launcher_config(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cluster)
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    gpu_types = [n for n, t in types.items() if t["resources"].get("GPU")]
    assert gpu_types, "the vLLM teacher and GPU training need GPU worker types"
    # Teacher generation autoscales: some GPU type starts at zero and may grow to several nodes.
    assert any(types[n].get("min_workers", 0) < types[n]["max_workers"] for n in gpu_types)
    assert any("[gpu]" in cmd for cmd in prepared["setup_commands"]), "nodes must install the gpu extra (vLLM)"


def test_cluster_yaml_keeps_secrets_home_and_names_a_locked_down_security_group(cluster):
    """Nodes get no environment, runs or secrets through the project mount; their security group is the one the
    README creates with SSH from the admin CIDR only (Ray would open SSH to the world in a group it creates)."""
    import fnmatch

    excluded = cluster["rsync_exclude"]
    for path in (".venv", "runs", ".env", ".env.local", "id_rsa.pem", "secrets.key", ".git"):
        assert any(fnmatch.fnmatch(path, pattern) for pattern in excluded), path
    assert ".gitignore" in cluster["rsync_filter"]
    group = cluster["provider"]["security_group"]["GroupName"]
    readme = (ROOT / "README.md").read_text()
    assert f"--group-name {group}" in readme and "--port 22 --cidr $ADMIN_CIDR" in readme
    assert "0.0.0.0/0" not in readme
    assert not any("SecurityGroupIds" in t["node_config"] for t in cluster["available_node_types"].values())


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_every_paper_config_fits_the_cluster(path, cluster):
    cfg = load_config(path)
    types = cluster["available_node_types"]
    workers = {n: t for n, t in types.items() if n != cluster["head_node_type"]}
    capacity = Counter()
    for t in workers.values():
        for k, v in t["resources"].items():
            capacity[k] += v * t["max_workers"]
    for role, (bundle, count) in stage_demands(cfg).items():
        assert any(fits(bundle, t["resources"]) for t in workers.values()), f"{role} {bundle} fits no node type"
        for k, v in bundle.items():
            assert v * count <= capacity[k], f"{count} x {role} need {v * count} {k}; the cluster has {capacity[k]}"


def test_paper_configs_cover_the_grid():
    names = {p.stem for p in PAPER_CONFIGS}
    for task in ("svamp", "cqa", "anli1", "esnli"):
        for student in ("t5-base", "t5-small"):
            for method in ("finetune", "dss", "qcrd"):
                assert f"{task}-{student}-{method}" in names
        for student in ("qwen2.5-0.5b", "smollm2-360m"):  # decoder-only students, full weights and LoRA
            for mode in ("full", "lora"):
                assert f"{task}-{student}-{mode}-qcrd" in names
    for p in PAPER_CONFIGS:
        cfg = load_config(p)
        assert (cfg.teacher.k, cfg.teacher.temperature, cfg.snapshots.j) == (5, 0.7, 5), p.name
        assert "Paper (arXiv 2405.13014" in p.read_text()


@pytest.mark.parametrize("path", [p for p in PAPER_CONFIGS if "-t5-" not in p.stem], ids=lambda p: p.stem)
def test_decoder_only_paper_configs_name_modules_their_model_has(path):
    """A causal config's LoRA targets exist in its architecture (Qwen2 / Llama, built empty on the meta device:
    no hub here), and it fits the model's context."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from qcrd_ray.students import lora

    cfg = load_config(path)
    assert cfg.student.family == "causal" and cfg.student.chat_template == "auto"
    assert (cfg.student.lora.r > 0) == ("-lora-" in path.stem)
    config_cls, model_cls, context = ((Qwen2Config, Qwen2ForCausalLM, 32768) if "qwen" in path.stem
                                      else (LlamaConfig, LlamaForCausalLM, 8192))
    with torch.device("meta"):
        model = model_cls(config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    if cfg.student.lora.r:
        assert lora.target_modules(model, cfg.student.lora) == list(cfg.student.lora.target_modules)
    assert cfg.student.max_input_len + cfg.student.max_target_len <= context


@pytest.mark.parametrize("path", CPU_CONFIGS, ids=lambda p: p.stem)
def test_cpu_configs_fit_a_two_core_laptop(path):
    cfg = load_config(path)
    demands = stage_demands(cfg)
    # Training runs beside its negative samplers; together they must leave room on 2 CPUs.
    concurrent = sum(demands[r][0]["CPU"] * demands[r][1] for r in ("train worker", "negative sampler"))
    assert concurrent <= 2.0, f"training + samplers need {concurrent} CPUs"
    assert demands["teacher actor"][0]["CPU"] * cfg.teacher.min_actors <= 2.0
    assert not any(b.get("GPU") for b, _ in demands.values())
