"""Configuration: one frozen dataclass per stage, the paper's defaults, loaded from YAML.

The resolved config is the single source of truth for a run. Values come from (lowest to highest priority):
the defaults below, a YAML file (``--config``), and ``--set section.key=value`` overrides. Every field is
validated: an unknown section or key, a value of the wrong type, a choice outside its allowed set or a number
out of range raises :class:`ConfigError` naming the key and what is allowed.

Choices and ranges live in each field's metadata (``choices=...``, ``lo``/``hi``), so validation, error
messages and ``qcrd config show`` all read the same declaration.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from qcrd_ray.data.synthetic import MIN_MAX_OPERAND


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def _choice(default: Any, *choices: Any) -> Any:
    return field(default=default, metadata={"choices": choices})


def _num(default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    return field(default=default, metadata={"lo": lo, "hi": hi})


TASKS = ("synthetic", "svamp", "cqa", "anli1", "esnli")


@dataclass(frozen=True)
class DataConfig:
    # None = the built-in synthetic arithmetic task (no download); else a DSS-layout folder holding
    # `<task>/<task>_<split>.json`, or a JSONL/Parquet file for a user task.
    data_dir: str | None = None
    task: str = "synthetic"  # one of TASKS, or a user task name when `format` is jsonl/parquet
    format: str = _choice("dss", "dss", "jsonl", "parquet")
    # user tasks: column mapping from the file's columns to ours (id, input, label, choices)
    columns: dict = field(default_factory=dict)
    answer_type: str = _choice("auto", "auto", "numeric", "choice", "text")
    train_split: str = "train"
    eval_split: str = "test"
    valid_fraction: float = _num(0.1, 0.0, 0.5)  # carved from train where a dataset has no valid split
    split_seed: int = 0
    max_rows: int | None = _num(None, 1)  # cap rows per split (quick runs); None = all
    synthetic_train_size: int = _num(600, 1)
    synthetic_eval_size: int = _num(150, 1)
    synthetic_seed: int = 0
    # operations per synthetic problem: 2 → "( ( a op b ) op c )", whose rationale's intermediate value the label lacks
    synthetic_steps: int = _num(1, 1, 3)
    # the largest number a synthetic problem states (None: up to 60); 9 = single digits, which a from-scratch
    # student learns to copy in a few hundred steps (docs/quality.md)
    synthetic_max_operand: int | None = _num(None, MIN_MAX_OPERAND)
    # 1: the equation-labelled task above; 2: testbed v2 (docs/quality.md), one-step problems whose operation the
    # wording implies, labelled with the final number; the synthetic teacher errs by a wording-tied misconception
    synthetic_version: int = _num(1, 1, 2)


@dataclass(frozen=True)
class TeacherConfig:
    backend: str = _choice("synthetic", "synthetic", "hf", "http", "vllm", "recorded")
    model: str | None = None  # HF name/path (hf, vllm) or API model name (http)
    k: int = _num(5, 1, 64)  # rationales sampled per question
    temperature: float = _num(0.7, 0.0, 2.0)
    max_tokens: int = _num(256, 1)
    stop: tuple = ()
    seed: int = 0
    # synthetic backend: the share of sampled rationales with a wrong step (the testbed's dial, docs/quality.md);
    # None = grows with the temperature (37 % at 0.7). hard_share of the questions err twice as often, mostly
    # with one shared wrong operator, so their majority can be wrong
    noise: float | None = _num(None, 0.0, 0.9)
    hard_share: float = _num(0.2, 0.0, 0.5)
    # Ray Data actor pool: autoscales between min_actors and max_actors with the backlog
    min_actors: int = _num(1, 1)
    max_actors: int = _num(2, 1)
    batch_size: int = _num(16, 1)
    num_cpus: float = _num(0.5, 0.0)  # per teacher actor (fractional on a laptop)
    num_gpus: float = _num(0.0, 0.0)  # per teacher actor (vllm / hf on a GPU cluster)
    shard_rows: int = _num(256, 1)  # examples per output Parquet shard (the unit of resumption)
    # times Ray restarts a lost teacher actor (killed, its node gone); its unfinished batches rerun on the new one
    max_restarts: int = _num(3, 0)
    # http backend (OpenAI-compatible)
    base_url: str = "http://127.0.0.1:8000/v1"
    api: str = _choice("chat", "chat", "completions")
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = _num(60.0, 0.1)
    max_retries: int = _num(4, 0)
    backoff_s: float = _num(1.0, 0.0)
    max_concurrency: int = _num(8, 1)
    # vllm backend
    tensor_parallel_size: int = _num(1, 1)
    max_model_len: int = _num(4096, 64)
    gpu_memory_utilization: float = _num(0.85, 0.05, 1.0)


@dataclass(frozen=True)
class SelfConsistencyConfig:
    # majority (paper): the majority answer's rationales are positives; gold: positives answer the gold label
    positive_rule: str = _choice("majority", "majority", "gold")


@dataclass(frozen=True)
class LoraConfig:
    # LoRA adapters through peft (qcrd_ray/students/lora.py): only the adapters train, snapshots carry only them,
    # the final model is saved merged (model/, the default for eval and serve) and as an adapter (adapter/)
    r: int = _num(0, 0)  # adapter rank; 0 = LoRA off (full fine-tuning)
    alpha: float = _num(16.0, 0.0)  # scaling: the update is (alpha / r) · B·A
    dropout: float = _num(0.0, 0.0, 1.0)
    # module names to adapt (e.g. [q_proj, v_proj]); empty = peft's default for the model type (T5: q, v)
    target_modules: tuple = ()


@dataclass(frozen=True)
class StudentConfig:
    # "tiny" = a small model of the family below (T5 or Llama-style) built from the tiny_* keys, with a Unigram
    # tokenizer trained on the task's text; anything else is a Hugging Face hub name or a local path
    # (google/t5-v1_1-base, Qwen/Qwen2.5-0.5B-Instruct)
    model: str = "tiny"
    # qcrd_ray/students/: seq2seq (T5: encoder-decoder) or causal (decoder-only: Llama, Qwen, SmolLM, GPT-2);
    # auto reads the model's config (a tiny model is seq2seq under auto)
    family: str = _choice("auto", "auto", "seq2seq", "causal")
    # causal students: auto = the tokenizer's own chat template where it has one (else the task prompt, said
    # once), none = always the task prompt, or the path of a Jinja file to use as the template
    chat_template: str = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_input_len: int = _num(256, 8)
    max_target_len: int = _num(128, 8)
    tiny_vocab_size: int = _num(800, 64)
    tiny_d_model: int = _num(64, 8)
    tiny_d_ff: int = _num(128, 8)
    tiny_layers: int = _num(2, 1)
    tiny_heads: int = _num(4, 1)
    dtype: str = _choice("float32", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LossConfig:
    alpha1: float = _num(0.5, 0.0)  # label task (L_pred)
    alpha2: float = _num(0.5, 0.0)  # contrastive rationale loss (L_cl)
    alpha3: float = _num(0.5, 0.0)  # discriminator loss (L_D), decayed each round
    alpha3_decay: float = _num(0.9, 0.0, 1.0)
    beta: float = _num(0.2, 0.0)  # weight of the negative term
    delta: float = _num(3.0, 0.0)  # margin: negatives whose loss exceeds delta give no gradient
    dss_lambda: float = _num(1.0, 0.0)  # DSS baseline: L_pred + lambda * L_rationale
    positives: str = _choice("sc", "sc", "single")  # ED ablation: all SC positives, or one teacher rationale
    negatives: str = _choice("both", "both", "none", "teacher", "student")  # NK ablation
    quality_judge: bool = True  # QJ ablation: off => s_pos = 1, s_neg = 0
    scheme: str = _choice("minmax", "minmax", "maxmin", "sampling", "mean", "wmean")  # many-to-one (Table 5)
    # what delta is compared against: the per-token mean CE of a negative (the spec) or its sequence-sum CE (a
    # near copy of a positive can then reach the margin); the negative term stays in per-token units either way
    margin_reduction: str = _choice("mean", "mean", "sum")
    # minmax's negative: the max-loss one (the spec), or the max-loss one still below the margin, so an example
    # whose worst negative is already beyond delta (a lagged student's babble) keeps a gradient from the others
    negative_pick: str = _choice("max", "max", "max_within_margin")
    # DSS's one rationale: the first parsed teacher sample (distilling step-by-step), or the first whose answer
    # is the gold label (the headroom control "clean-DSS": clean rationales only; none such: label task only)
    dss_rationale: str = _choice("first", "first", "gold")


@dataclass(frozen=True)
class DiscriminatorConfig:
    share_encoder: bool = False  # True: D pools the student's encoder instead of its own copy
    hidden: int = _num(256, 1)
    pretrain_steps: int = _num(500, 0)  # upper bound on pre-training steps on teacher positives vs negatives
    pretrain_batch_size: int = _num(16, 1)
    refresh_steps: int = _num(20, 0)  # steps on new student negatives at each round end
    lr: float = _num(1e-4, 0.0)
    mask_prob: float = _num(0.15, 0.0, 1.0)  # augmentation: random word masking
    replace_prob: float = _num(0.1, 0.0, 1.0)  # augmentation: random word replacement
    # cost options (docs/design.md, "QCRD step cost"); the spec's D is layers 0, sharing off, pairs 0. Default:
    # layers 1 + pairs 16, the mildest change measured at <= 3x a DSS step (2.7x at T5-small shape vs 5.3x for the
    # spec's D, docs/benchmarks.md). Its quality: 3.8 points [-8.1, +0.5] below the spec's D on the testbed, the
    # one-layer D being what costs (sampled pairs alone lose nothing); layers 0 + pairs 16 (3.5x) keeps quality
    layers: int = _num(1, 0)  # D's encoder = the first `layers` blocks of the student's encoder copy; 0 = all
    # D reads the student's own (detached) encoder states of `explain: x` and encodes only the rationale itself
    share_question_states: bool = False
    # L_D with gradient on the pairs of a uniform sample of examples holding about this many pairs; 0 = every pair
    pairs_per_step: int = _num(16, 0)


@dataclass(frozen=True)
class SnapshotConfig:
    j: int = _num(5, 0)  # negatives come from the student as it was j rounds ago
    neg_source: str = _choice("lagged", "lagged", "fixed")  # fixed: always the initial student (round 0)
    temperature: float = _num(1.5, 0.0, 5.0)
    max_new_tokens: int = _num(64, 1)
    sampler_actors: int = _num(1, 1)
    sampler_num_cpus: float = _num(0.5, 0.0)
    sampler_num_gpus: float = _num(0.0, 0.0)
    sampler_batch_size: int = _num(32, 1)
    # what samples the negatives (qcrd_ray/students/engines.py): hf = Hugging Face generate (any student, any
    # machine); vllm = vLLM on GPU nodes, causal students only, a LoRA snapshot served as a LoRARequest (not run
    # on the project's CPU machines: tested against a fake engine only)
    engine: str = _choice("hf", "hf", "vllm")
    vllm_gpu_memory_utilization: float = _num(0.3, 0.05, 1.0)  # a sampler's share of its GPU (engine vllm)
    # times Ray restarts the snapshot store / each sampler actor after its process dies (bounded, so an actor
    # that cannot start does not restart forever); a sampler lost for good: its examples get teacher negatives
    actor_restarts: int = _num(3, 0)


@dataclass(frozen=True)
class TrainConfig:
    method: str = _choice("qcrd", "qcrd", "dss", "finetune")
    num_workers: int = _num(2, 1)
    use_gpu: bool = False
    num_cpus_per_worker: float = _num(0.5, 0.0)
    batch_size: int = _num(8, 1)  # per worker
    # 3e-3 suits the tiny from-scratch student of the embedded default; pretrained T5s want ~5e-5 (configs/paper)
    lr: float = _num(3e-3, 0.0)
    weight_decay: float = _num(0.0, 0.0)
    warmup_steps: int = _num(0, 0)
    rounds: int = _num(20, 1)  # training length in rounds
    round_steps: int = _num(0, 0)  # optimizer steps per round; 0 = one epoch
    grad_clip: float = _num(1.0, 0.0)
    keep_checkpoints: int = _num(2, 1)
    # times Ray Train restarts the worker group from the latest checkpoint after a worker dies (0: a lost worker
    # ends the run, which a rerun then resumes)
    max_failures: int = _num(3, 0)
    log_every: int = _num(10, 1)
    seed: int = 0
    # where rank 0's metrics and the eval results go (qcrd_ray/trackers.py): any of tensorboard, mlflow, wandb;
    # a tracker is imported only when listed here
    trackers: tuple = ("tensorboard",)
    tracking_uri: str | None = None  # MLflow server; None = MLflow's own default (MLFLOW_TRACKING_URI or ./mlruns)
    experiment: str = "qcrd"  # MLflow experiment / W&B project (a sweep sets its name)
    run_name: str | None = None  # tracker run name; None = the method's run directory
    wandb_mode: str = _choice("offline", "offline", "online")
    # cost and memory (docs/design.md, "QCRD step cost"): autocast of the student and D (losses stay fp32)
    precision: str = _choice("fp32", "fp32", "bf16")
    # micro-batches of batch_size per optimizer step: the global batch is batch_size × num_workers × grad_accum_steps
    grad_accum_steps: int = _num(1, 1)
    # memory for the [chunk, T, vocab] logits of one no-grad scoring chunk; 0 = sized to the device (a quarter of
    # the free GPU memory, 256 MiB on CPU). Fixed small chunks made a GPU step launch-bound: 4-9x DSS at 2.4x its ops
    score_chunk_mb: int = _num(0, 0)
    # identical candidate texts of an example scored once, weighted by their multiplicity (exact for min/max)
    dedup_candidates: bool = True


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = _num(8000, 1, 65535)
    max_batch_size: int = _num(16, 1)
    # the longest a batch waits for the clients of the previous batch to come back (serve/batching.py); a lone
    # client never waits it. 0 = take whatever is queued when the model is free
    batch_wait_timeout_s: float = _num(0.1, 0.0)
    min_replicas: int = _num(1, 0)
    max_replicas: int = _num(2, 1)
    target_ongoing_requests: float = _num(4.0, 0.1)
    max_ongoing_requests: int = _num(32, 1)
    max_queued_requests: int = _num(64, -1)  # per caller (the HTTP proxy); beyond it: 503. -1 = unbounded
    num_cpus: float = _num(0.5, 0.0)
    max_input_chars: int = _num(2000, 1)
    max_inputs_per_request: int = _num(32, 1)
    max_new_tokens: int = _num(128, 1)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    self_consistency: SelfConsistencyConfig = field(default_factory=SelfConsistencyConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    snapshots: SnapshotConfig = field(default_factory=SnapshotConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections: Mapping[str, Any]) -> "Config":
        """A copy with some keys of some sections changed, validated: ``cfg.replace(train={"rounds": 2})``."""
        return from_dict(_merge(self.to_dict(), sections))


# --------------------------------------------------------------------------------------------------------------
# loading and validation


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's annotation, converting what YAML cannot tell apart (1 → 1.0)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(where, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("on", "off", "true", "false", "yes", "no"):
            return value.lower() in ("on", "true", "yes")
        raise ConfigError(f"{where}: expected true/false (or on/off), got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):  # YAML 1.1 reads 5e-4 as a string
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if annotation is tuple:
        if isinstance(value, (list, tuple)):
            if not all(isinstance(v, str) for v in value):  # YAML reads [Q:] as [{Q: null}]
                raise ConfigError(f"{where}: expected a list of strings, got {value!r} (quote items containing ':')")
            return tuple(value)
        if isinstance(value, str):
            return (value,)
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if annotation is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    if dataclasses.is_dataclass(annotation):  # a nested group of keys (student.lora)
        if isinstance(value, annotation):
            return value
        return _build_section(where, annotation, value)
    return value


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {name}.{unknown[0]}; allowed keys in '{name}': {', '.join(sorted(fields))}"
        )
    values = {}
    for key, value in raw.items():
        where = f"{name}.{key}"
        f = fields[key]
        value = _coerce(where, value, hints[key])
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
        lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
        if value is not None and lo is not None and value < lo:
            raise ConfigError(f"{where}: {value!r} is out of range; must be >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
        if value is not None and hi is not None and value > hi:
            raise ConfigError(f"{where}: {value!r} is out of range; must be <= {hi}" + (f" and >= {lo}" if lo is not None else ""))
        values[key] = value
    return cls(**values)


def from_dict(raw: Mapping | None) -> Config:
    raw = dict(raw or {})
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section '{unknown[0]}'; allowed sections: {', '.join(sections)}")
    hints = typing.get_type_hints(Config)
    cfg = Config(**{name: _build_section(name, hints[name], raw.get(name)) for name in sections})
    _check_cross_field(cfg)
    return cfg


def _check_cross_field(cfg: Config) -> None:
    d = cfg.data
    if d.synthetic_version == 2 and (d.data_dir is not None or d.task != "synthetic" or d.synthetic_steps != 1):
        raise ConfigError("data.synthetic_version: 2 is a mode of the built-in synthetic task with one step; "
                          "leave data.data_dir unset, data.task synthetic and data.synthetic_steps 1")
    if cfg.loss.negative_pick != "max" and cfg.loss.scheme != "minmax":
        raise ConfigError(f"loss.negative_pick: {cfg.loss.negative_pick} chooses minmax's max-loss negative; "
                          f"loss.scheme {cfg.loss.scheme} picks otherwise (set loss.scheme=minmax)")
    if cfg.teacher.min_actors > cfg.teacher.max_actors:
        raise ConfigError(
            f"teacher.min_actors ({cfg.teacher.min_actors}) must be <= teacher.max_actors ({cfg.teacher.max_actors})"
        )
    if cfg.serve.min_replicas > cfg.serve.max_replicas:
        raise ConfigError(
            f"serve.min_replicas ({cfg.serve.min_replicas}) must be <= serve.max_replicas ({cfg.serve.max_replicas})"
        )
    if cfg.teacher.backend == "recorded" and cfg.teacher.k != 1:
        raise ConfigError("teacher.k: the recorded backend replays one rationale per example; set teacher.k=1")
    unknown = sorted(set(cfg.train.trackers) - {"tensorboard", "mlflow", "wandb"})
    if unknown:
        raise ConfigError(f"train.trackers: {unknown[0]!r} is not a tracker; choose from tensorboard, mlflow, wandb")
    if cfg.teacher.backend in ("hf", "vllm") and not cfg.teacher.model:
        raise ConfigError(f"teacher.model: the {cfg.teacher.backend} backend needs a model name or path")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.rounds=3"`` → ``(["train", "rounds"], 3)``, ``"student.lora.r=8"`` → ``(["student", "lora", "r"],
    8)``; the value is parsed as YAML (``3``, ``0.5``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path, _, value = text.partition("=")
    keys = path.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"--set {text!r}: expected section.key=value (e.g. train.rounds=3)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return keys, parsed


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML file ← ``section.key=value`` overrides, validated."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    for text in overrides:
        raw = set_path(raw, *parse_override(text))
    return from_dict(raw)


def set_path(raw: Mapping, keys: list[str], value: Any) -> dict:
    """A copy of the nested mapping ``raw`` with ``keys`` (``["student", "lora", "r"]``) set to ``value``."""
    out = dict(raw)
    head, rest = keys[0], keys[1:]
    if not rest:
        out[head] = value
        return out
    inner = out.get(head)
    if inner is None:
        inner = {}
    if not isinstance(inner, Mapping):
        raise ConfigError(f"{'.'.join(keys[:1])}: expected a mapping of keys")
    out[head] = set_path(inner, rest, value)
    return out
