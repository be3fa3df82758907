"""Configuration: one frozen dataclass per stage, the paper's defaults, loaded from YAML.

The resolved config is the single source of truth for a run. Values come from (lowest to highest priority):
the defaults below, a YAML file (``--config``), and ``--set section.key=value`` overrides. Every field is
validated: an unknown section or key, a value of the wrong type, a choice outside its allowed set or a number
out of range raises :class:`ConfigError` naming the key and what is allowed.

Choices, ranges and a one-line help live in each field's metadata (``choices=...``, ``lo``/``hi``, ``help``, as
TRL's ``field(metadata={"help": ...})``), so validation, error messages and ``qcrd config explain`` all read the
same declaration. A field's help says what it means (units, what 0 or null does); a comment beside it keeps only
the why.
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

from qcrd_ray.data.formats import FORMATS, user_formats
from qcrd_ray.data.synthetic import MIN_MAX_OPERAND
from qcrd_ray.data.tasks import BUILTIN_TASKS
from qcrd_ray.errors import ConfigError
from qcrd_ray.methods import SPECS
from qcrd_ray.teacher.backends import BACKENDS
from qcrd_ray.trackers import TRACKERS


def _field(default: Any = dataclasses.MISSING, *, help: str, factory: Any = dataclasses.MISSING) -> Any:
    """A field with its one-line ``help`` (``qcrd config explain``); ``factory`` for a mutable default."""
    return field(default=default, default_factory=factory, metadata={"help": help})


def _choice(default: Any, *choices: Any, help: str) -> Any:
    return field(default=default, metadata={"choices": choices, "help": help})


def _registry_choice(default: str, registry: Mapping[str, Any], *, help: str) -> Any:
    """A choice among a registry's names (teacher backends, methods, ...), read live: an entry registered after
    this module loaded is a valid choice too."""
    return field(default=default, metadata={"choices": registry.keys(), "help": help})


def _num(default: Any, lo: float | None = None, hi: float | None = None, *, help: str) -> Any:
    return field(default=default, metadata={"lo": lo, "hi": hi, "help": help})


@dataclass(frozen=True)
class DataConfig:
    data_dir: str | None = _field(
        None, help="where the data is: a DSS-layout folder holding <task>/<task>_<split>.json, or a user task's "
                   "JSONL/Parquet file (its train split) or folder of splits, or (data.format hf) a Hugging Face "
                   "dataset: a save_to_disk folder, data files or a hub name; null = the built-in synthetic task")
    task: str = _field("synthetic", help=f"task name: one of {', '.join(BUILTIN_TASKS)}, or a user task's name when "
                                         f"data.format is {user_formats()}")
    format: str = _registry_choice("dss", FORMATS, help="how data.data_dir is read (the format registry, "
                                   "qcrd_ray/data/formats.py): " + "; ".join(f"{f.name} ({f.help})"
                                                                            for f in FORMATS.values()))
    columns: dict = _field(factory=dict, help="user tasks: our column (id, input, label, choices, rationale or "
                                              "rationales) -> the file's column; a column not listed keeps our name")
    answer_type: str = _choice("auto", "auto", "numeric", "choice", "text",
                               help="how answers are parsed and scored; auto = a built-in task's own type (a user "
                                    "task: choice, scored as text where a row has no choices)")
    train_split: str = _field("train", help="the split the teacher labels and the student trains on")
    eval_split: str = _field("test", help="the split `qcrd run` evaluates and reports on (`qcrd eval`'s default "
                                          "--split)")
    valid_fraction: float = _num(0.1, 0.0, 0.5, help="share of the train rows carved out as the valid split where "
                                                     "a dataset has no valid file (svamp, cqa); train then excludes "
                                                     "them")
    split_seed: int = _field(0, help="seed of the random choice of the valid rows carved from train "
                                     "(data.valid_fraction)")
    max_rows: int | None = _num(None, 1, help="cap on the rows of each split (quick runs); null = all rows")
    synthetic_train_size: int = _num(600, 1, help="synthetic task: problems in its train split")
    synthetic_eval_size: int = _num(150, 1, help="synthetic task: problems in each of its valid and test splits")
    synthetic_seed: int = _field(0, help="synthetic task: seed of the problem generator (splits never share a "
                                         "problem)")
    synthetic_steps: int = _num(1, 1, 3, help="synthetic task: operations per problem; 2 = '( ( a op b ) op c )', "
                                              "whose rationale's intermediate value the label lacks")
    # 9 = single digits, which a from-scratch student learns to copy in a few hundred steps (docs/quality.md)
    synthetic_max_operand: int | None = _num(None, MIN_MAX_OPERAND,
                                             help="synthetic task: the largest number a problem states (its label "
                                                  "included); null = up to 60")
    # testbed v2 (docs/quality.md): the synthetic teacher errs by a misconception tied to the wording
    synthetic_version: int = _num(1, 1, 2, help="synthetic task: 1 = equation-labelled problems; 2 = testbed v2, "
                                                "one-step problems whose operation the wording implies, labelled "
                                                "with the final number")


@dataclass(frozen=True)
class TeacherConfig:
    backend: str = _registry_choice("synthetic", BACKENDS, help="who writes the rationales: " + ", ".join(
        f"{b.name} ({b.help})" for b in BACKENDS.values()))
    model: str | None = _field(None, help="Hugging Face name or path (hf, vllm) or the API's model name (http); "
                                          "null = none (synthetic, recorded)")
    k: int = _num(5, 1, 64, help="rationales sampled per question (K), over which self-consistency votes")
    temperature: float = _num(0.7, 0.0, 2.0, help="teacher sampling temperature; 0 = greedy (hf); the synthetic "
                                                   "teacher errs more as it grows (see teacher.noise)")
    max_tokens: int = _num(256, 1, help="the most tokens the teacher generates per rationale")
    stop: tuple = _field((), help="stop sequences: a rationale ends before the first one (hf, http, vllm); empty = "
                                  "none")
    seed: int = _field(0, help="teacher seed: each sample's seed is derived from it, the example id and the "
                               "sample index (so a rerun samples the same)")
    # hard questions err mostly with one shared wrong operator, so their majority can be wrong
    noise: float | None = _num(None, 0.0, 0.9, help="synthetic backend: share of sampled rationales with a wrong "
                                                    "step (the testbed's dial, docs/quality.md); null = grows with "
                                                    "teacher.temperature (37 % at 0.7)")
    hard_share: float = _num(0.2, 0.0, 0.5, help="synthetic backend: share of questions that are hard, erring twice "
                                                 "as often as the others")
    min_actors: int = _num(1, 1, help="fewest teacher actors: the Ray Data pool autoscales between min_actors and "
                                      "max_actors with the backlog")
    max_actors: int = _num(2, 1, help="most teacher actors in the Ray Data pool (vllm: engines)")
    batch_size: int = _num(16, 1, help="sample rows per teacher batch (each question counts k times)")
    num_cpus: float = _num(0.5, 0.0, help="CPUs reserved per teacher actor (fractional on a laptop)")
    num_gpus: float = _num(0.0, 0.0, help="GPUs reserved per teacher actor (hf or vllm on a GPU cluster); 0 = CPU "
                                          "only")
    shard_rows: int = _num(256, 1, help="examples per output Parquet shard, the unit of resumption (a rerun "
                                        "redoes only unfinished shards)")
    poison_retries: int = _num(2, 0, help="times a row that crashes the backend (an exception, not a failed request) "
                                          "is retried alone before it is recorded in errors.jsonl and the run goes "
                                          "on; its batch's other rows are kept")
    max_restarts: int = _num(3, 0, help="times Ray restarts a lost teacher actor (killed, its node gone), its "
                                        "unfinished batches rerunning on the new one; 0 = never")
    base_url: str = _field("http://127.0.0.1:8000/v1", help="http backend: base URL of the OpenAI-compatible API")
    api: str = _choice("chat", "chat", "completions",
                       help="http and vllm backends: chat (messages, the model's chat template) or completions "
                            "(the raw prompt)")
    api_key_env: str = _field("OPENAI_API_KEY", help="http backend: environment variable holding the API key, "
                                                     "sent as a Bearer token (unset: no Authorization header)")
    api_key_file: str = _field("", help="http backend: a file (local path on every node, or a storage URI such as "
                                        "s3://bucket/secrets/teacher-key) holding the API key, read by each "
                                        "teacher actor on its own node; wins over api_key_env. The way to reach "
                                        "actors on other nodes without the key in job metadata or logs")
    timeout_s: float = _num(60.0, 0.1, help="http backend: timeout of one request, in seconds")
    max_retries: int = _num(4, 0, help="http backend: retries of a request after a timeout, connection error, 429 "
                                       "or 5xx; 0 = one attempt")
    backoff_s: float = _num(1.0, 0.0, help="http backend: delay before the first retry in seconds, doubling at "
                                           "each retry (at least Retry-After, at most 60 s)")
    max_concurrency: int = _num(8, 1, help="http backend: requests in flight at once per teacher actor")
    tensor_parallel_size: int = _num(1, 1, help="vllm backend: GPUs each engine shards the model over")
    max_model_len: int = _num(4096, 64, help="hf and vllm backends: the teacher's context in tokens, prompt plus "
                                             "rationale (hf: at most the model's own; a longer prompt loses its "
                                             "start)")
    gpu_memory_utilization: float = _num(0.85, 0.05, 1.0, help="vllm backend: share of each GPU's memory an "
                                                               "engine may take")
    # a list of mappings, each validated against these keys by teacher/sources.py
    sources: tuple[dict, ...] = _field((), help="several teachers mixed: [{name, backend, weight, ...any teacher key "
                                                "but k and shard_rows}]; each draws weight/Σweight of the K samples "
                                                "per question (teacher/sources.py), the other keys override the "
                                                "top-level teacher keys for it; empty = one teacher, the top-level "
                                                "keys")


@dataclass(frozen=True)
class SelfConsistencyConfig:
    positive_rule: str = _choice("majority", "majority", "gold",
                                 help="teacher positives: majority (the paper: the rationales giving the majority "
                                      "answer) or gold (those giving the gold label); other answered ones are "
                                      "negatives")


@dataclass(frozen=True)
class LoraConfig:
    # LoRA adapters through peft (qcrd_ray/students/lora.py): only the adapters train, snapshots carry only them,
    # the final model is saved merged (model/, the default for eval and serve) and as an adapter (adapter/)
    r: int = _num(0, 0, help="LoRA adapter rank; 0 = LoRA off (full fine-tuning)")
    alpha: float = _num(16.0, 0.0, help="LoRA scaling: the update is (alpha / r) · B·A")
    dropout: float = _num(0.0, 0.0, 1.0, help="dropout probability on the adapters' input; 0 = none")
    target_modules: tuple = _field((), help="module names to adapt (e.g. [q_proj, v_proj]); empty = peft's default "
                                            "for the model type (T5: q, v)")


@dataclass(frozen=True)
class StudentConfig:
    model: str = _field("tiny", help="tiny (a small model of student.family from the tiny_* keys, with a Unigram "
                                     "tokenizer trained on the task's text), or a Hugging Face hub name or local "
                                     "path (google/t5-v1_1-base, Qwen/Qwen2.5-0.5B-Instruct)")
    family: str = _choice("auto", "auto", "seq2seq", "causal",
                          help="seq2seq (T5: encoder-decoder) or causal (decoder-only: Llama, Qwen, SmolLM, GPT-2), in "
                               "qcrd_ray/students/; auto reads the model's config (a tiny model is seq2seq)")
    chat_template: str = _field("auto", help="causal students: auto = the tokenizer's chat template where it has "
                                             "one (else the task prompt), none = always the task prompt, or a Jinja "
                                             "file's path")
    lora: LoraConfig = _field(factory=LoraConfig, help="LoRA adapters through peft (student.lora.*); r 0 = off")
    max_input_len: int = _num(256, 8, help="the longest student prompt in tokens: a longer example is rejected, "
                                           "never truncated (D's pair texts are cut to it)")
    max_target_len: int = _num(128, 8, help="the longest student target in tokens (longer ones are truncated); "
                                            "also the evaluation's generation limit")
    tiny_vocab_size: int = _num(800, 64, help="tiny student: vocabulary size of its Unigram tokenizer")
    tiny_d_model: int = _num(64, 8, help="tiny student: hidden size")
    tiny_d_ff: int = _num(128, 8, help="tiny student: inner size of the feed-forward blocks")
    tiny_layers: int = _num(2, 1, help="tiny student: layers (a seq2seq model: in the encoder and in the decoder)")
    tiny_heads: int = _num(4, 1, help="tiny student: attention heads")
    dtype: str = _choice("float32", "float32", "bfloat16", "float16",
                         help="dtype of the student's weights (see train.precision for autocast)")


@dataclass(frozen=True)
class LossConfig:
    alpha1: float = _num(0.5, 0.0, help="weight of the label task loss (L_pred)")
    alpha2: float = _num(0.5, 0.0, help="weight of the contrastive rationale loss (L_cl)")
    alpha3: float = _num(0.5, 0.0, help="initial weight of the discriminator loss (L_D), decayed each round")
    alpha3_decay: float = _num(0.9, 0.0, 1.0, help="alpha3's factor per round: round r uses alpha3 · "
                                                   "alpha3_decay^r; 1 = constant")
    beta: float = _num(0.2, 0.0, help="weight of the negative term of L_cl")
    delta: float = _num(3.0, 0.0, help="margin, in CE units (loss.margin_reduction): negatives whose loss exceeds "
                                       "delta give no gradient")
    dss_lambda: float = _num(1.0, 0.0, help="DSS baseline: its loss is L_pred + dss_lambda · L_rationale")
    positives: str = _choice("sc", "sc", "single", help="ED ablation: sc = all self-consistent teacher positives, "
                                                        "single = one teacher rationale")
    negatives: str = _choice("both", "both", "none", "teacher", "student",
                             help="NK ablation: the negatives trained against (teacher, student, both or none)")
    quality_judge: bool = _field(True, help="QJ ablation: false = no discriminator scores (s_pos = 1, s_neg = 0)")
    scheme: str = _choice("minmax", "minmax", "maxmin", "sampling", "mean", "wmean",
                          help="many-to-one scheme (Table 5): minmax (the paper: min loss over positives, max over "
                               "negatives), maxmin, sampling (one drawn), mean, wmean (weighted by D's scores)")
    # sum: a near copy of a positive can then reach the margin
    margin_reduction: str = _choice("mean", "mean", "sum",
                                    help="what delta is compared against: a negative's per-token mean CE (mean, the "
                                         "spec) or its sequence-sum CE; the negative term stays per-token")
    # max_within_margin: an example whose worst negative is already beyond delta (a lagged student's babble) keeps
    # a gradient from the others
    negative_pick: str = _choice("max", "max", "max_within_margin",
                                 help="minmax's negative: the max-loss one (max, the spec) or the max-loss one still "
                                      "below delta")
    # gold is the headroom control "clean-DSS": clean rationales only
    dss_rationale: str = _choice("first", "first", "gold",
                                 help="DSS's one rationale: the first parsed teacher sample (first, distilling "
                                      "step-by-step) or the first whose answer is the gold label (none: label only)")


@dataclass(frozen=True)
class DiscriminatorConfig:
    share_encoder: bool = _field(False, help="true: D pools the student's own encoder instead of its own copy")
    hidden: int = _num(256, 1, help="hidden size of D's scoring head")
    pretrain_steps: int = _num(500, 0, help="most pre-training steps of D on teacher positives vs negatives; 0 = "
                                            "no pre-training")
    pretrain_batch_size: int = _num(16, 1, help="pairs per step of D's pre-training and round-end refresh")
    refresh_steps: int = _num(20, 0, help="D's steps on the new student negatives at each round end; 0 = none")
    lr: float = _num(1e-4, 0.0, help="D's learning rate (pre-training, refresh and its own weights in the joint "
                                     "step)")
    mask_prob: float = _num(0.15, 0.0, 1.0, help="augmentation of the rarer class: probability of masking each "
                                                 "word")
    replace_prob: float = _num(0.1, 0.0, 1.0, help="augmentation of the rarer class: probability of replacing each "
                                                   "word by a random one")
    # cost options (docs/design.md, "QCRD step cost"); the spec's D is layers 0, sharing off, pairs 0. Default:
    # layers 1 + pairs 16, the mildest change measured at <= 3x a DSS step (2.7x at T5-small shape vs 5.3x for the
    # spec's D, docs/benchmarks.md). Its quality: 3.8 points [-8.1, +0.5] below the spec's D on the testbed, the
    # one-layer D being what costs (sampled pairs alone lose nothing); layers 0 + pairs 16 (3.5x) keeps quality
    layers: int = _num(1, 0, help="D's encoder = the first `layers` blocks of the student's encoder copy; 0 = all")
    share_question_states: bool = _field(False, help="true: D reads the student's own (detached) encoder states of "
                                                     "`explain: x` and encodes only the rationale itself")
    pairs_per_step: int = _num(16, 0, help="L_D's gradient only on a uniform sample of examples holding about this "
                                           "many pairs; 0 = every pair")


@dataclass(frozen=True)
class SnapshotConfig:
    j: int = _num(5, 1, help="lag in rounds: student negatives come from the student as it was j rounds ago (the "
                             "initial one before that); at least 1: a round's negatives are sampled while the round "
                             "before trains")
    neg_source: str = _choice("lagged", "lagged", "fixed",
                              help="lagged = the student j rounds ago; fixed = always the initial student (round 0)")
    temperature: float = _num(1.5, 0.0, 5.0, help="sampling temperature of the student negatives")
    max_new_tokens: int = _num(64, 1, help="the most tokens of one student negative (a longer one is cut off)")
    sampler_actors: int = _num(1, 1, help="negative sampler actors, each sampling its part of the training "
                                          "examples")
    sampler_num_cpus: float = _num(0.5, 0.0, help="CPUs reserved per sampler actor")
    sampler_num_gpus: float = _num(0.0, 0.0, help="GPUs reserved per sampler actor; 0 = CPU only")
    sampler_batch_size: int = _num(32, 1, help="examples per generate call of a sampler actor")
    # vllm serves a LoRA snapshot as a LoRARequest; it is not run on the project's CPU machines: tested against a
    # fake engine only
    engine: str = _choice("hf", "hf", "vllm",
                          help="what samples the negatives (qcrd_ray/students/engines.py): hf = Hugging Face "
                               "generate (any student); vllm = vLLM on GPU nodes, causal students only")
    vllm_gpu_memory_utilization: float = _num(0.3, 0.05, 1.0, help="engine vllm: a sampler's share of its GPU's "
                                                                   "memory")
    # bounded, so an actor that cannot start does not restart forever
    actor_restarts: int = _num(3, 0, help="times Ray restarts the snapshot store / a sampler actor whose process "
                                          "died; a sampler lost for good: its examples get teacher negatives")


@dataclass(frozen=True)
class TrainConfig:
    method: str = _registry_choice("qcrd", SPECS, help="what trains: " + "; ".join(
        f"{s.name} = {s.summary}" for s in SPECS.values()))
    num_workers: int = _num(2, 1, help="Ray Train workers (data-parallel ranks)")
    use_gpu: bool = _field(False, help="true: one GPU per worker (NCCL); false: CPU workers (gloo)")
    num_cpus_per_worker: float = _num(0.5, 0.0, help="CPUs reserved per training worker")
    batch_size: int = _num(8, 1, help="examples per worker in one micro-batch")
    # 3e-3 suits the tiny from-scratch student of the embedded default; pretrained T5s want ~5e-5 (configs/paper)
    lr: float = _num(3e-3, 0.0, help="the student's learning rate (AdamW) after warmup")
    weight_decay: float = _num(0.0, 0.0, help="AdamW weight decay; 0 = none")
    warmup_steps: int = _num(0, 0, help="optimizer steps of linear learning-rate warmup, then constant; 0 = none")
    rounds: int = _num(20, 1, help="training length in rounds (a checkpoint at each round end)")
    round_steps: int = _num(0, 0, help="optimizer steps per round; 0 = one epoch of the train split")
    grad_clip: float = _num(1.0, 0.0, help="largest global gradient norm (clipped above it); 0 = no clipping")
    keep_checkpoints: int = _num(2, 1, help="round checkpoints kept (older ones are deleted)")
    max_failures: int = _num(3, 0, help="times Ray Train restarts the worker group from the latest checkpoint "
                                        "after a worker dies; 0 = a lost worker ends the run (a rerun resumes it)")
    log_every: int = _num(10, 1, help="log the training metrics every this many optimizer steps")
    seed: int = _field(0, help="training seed: a tiny student's initial weights, batch order and sampling draws")
    trackers: tuple = _field(("tensorboard",), help="where rank 0's metrics and the eval results go "
                                                    f"(qcrd_ray/trackers.py): any of {', '.join(TRACKERS)}, "
                                                    "each imported only when listed; empty = none")
    tracking_uri: str | None = _field(None, help="MLflow server; null = MLflow's own default (MLFLOW_TRACKING_URI "
                                                 "or ./mlruns)")
    experiment: str = _field("qcrd", help="MLflow experiment / W&B project (a sweep sets its name)")
    run_name: str | None = _field(None, help="tracker run name; null = the method's run directory")
    wandb_mode: str = _choice("offline", "offline", "online", help="W&B mode: offline (logged locally) or online")
    # cost and memory: docs/design.md, "QCRD step cost"
    precision: str = _choice("fp32", "fp32", "bf16",
                             help="autocast of the student and D: fp32 (none) or bf16 (the losses stay fp32)")
    grad_accum_steps: int = _num(1, 1, help="micro-batches per optimizer step: the global batch is batch_size × "
                                            "num_workers × grad_accum_steps")
    # fixed small chunks made a GPU step launch-bound: 4-9x DSS at 2.4x its ops
    score_chunk_mb: int = _num(0, 0, help="MiB for the [chunk, T, vocab] logits of one no-grad scoring chunk; 0 = "
                                          "sized to the device (a quarter of free GPU memory, 256 MiB on CPU)")
    dedup_candidates: bool = _field(True, help="score identical candidate texts of an example once, weighted by "
                                               "their multiplicity (exact for min/max)")


@dataclass(frozen=True)
class ServeConfig:
    host: str = _field("127.0.0.1", help="address the HTTP server listens on")
    port: int = _num(8000, 1, 65535, help="HTTP port")
    max_batch_size: int = _num(16, 1, help="the most inputs a replica generates for in one batch")
    batch_wait_timeout_s: float = _num(0.1, 0.0, help="seconds a batch waits at most for the previous batch's "
                                                      "clients to come back (a lone client never waits); 0 = take "
                                                      "what is queued when the model is free (serve/batching.py)")
    min_replicas: int = _num(1, 0, help="fewest replicas the autoscaler keeps; 0 = none while idle")
    max_replicas: int = _num(2, 1, help="most replicas the autoscaler starts")
    target_ongoing_requests: float = _num(4.0, 0.1, help="autoscaling target: ongoing requests per replica")
    max_ongoing_requests: int = _num(32, 1, help="the most requests a replica handles at once")
    max_queued_requests: int = _num(64, -1, help="requests queued per caller (the HTTP proxy) beyond those "
                                                 "ongoing, the rest get 503; -1 = unbounded")
    num_cpus: float = _num(0.5, 0.0, help="CPUs reserved per replica")
    max_input_chars: int = _num(2000, 1, help="the longest input a request may send, in characters (else 422)")
    max_inputs_per_request: int = _num(32, 1, help="the most inputs (or samples n) in one request (else 422)")
    max_new_tokens: int = _num(128, 1, help="default and upper bound of the tokens generated per input")
    max_body_bytes: int = _num(1_048_576, 1, help="the largest request body, in bytes (else 413, before it is "
                                                  "parsed)")


@dataclass(frozen=True)
class Config:
    data: DataConfig = _field(factory=DataConfig, help="the task and its data (the built-in synthetic task by "
                                                       "default)")
    teacher: TeacherConfig = _field(factory=TeacherConfig, help="the teacher that samples K rationales per "
                                                                "question (qcrd teach)")
    self_consistency: SelfConsistencyConfig = _field(factory=SelfConsistencyConfig, help="how a question's "
                                                     "rationales split into positives and negatives")
    student: StudentConfig = _field(factory=StudentConfig, help="the student model (and its LoRA adapters)")
    loss: LossConfig = _field(factory=LossConfig, help="QCRD's loss weights, margin and ablation switches")
    discriminator: DiscriminatorConfig = _field(factory=DiscriminatorConfig, help="the quality discriminator D")
    snapshots: SnapshotConfig = _field(factory=SnapshotConfig, help="lagged student snapshots and the actors that "
                                                                    "sample student negatives from them")
    train: TrainConfig = _field(factory=TrainConfig, help="training with Ray Train: method, workers, optimizer, "
                                                          "length, faults, trackers, cost")
    serve: ServeConfig = _field(factory=ServeConfig, help="qcrd serve: server, batching, autoscaling and request "
                                                          "limits")

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections: Mapping[str, Any]) -> "Config":
        """A copy with some keys of some sections changed, validated: ``cfg.replace(train={"rounds": 2})``."""
        return from_dict(merge(self.to_dict(), sections))


# --------------------------------------------------------------------------------------------------------------
# loading and validation


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def merge(base: dict, update: Mapping) -> dict:
    """A copy of the raw config ``base`` with ``update``'s keys set, nested mappings merged key by key (a sweep's
    ``base`` over the config file it names)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
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
    if origin is tuple and len(typing.get_args(annotation)) == 2 and typing.get_args(annotation)[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(annotation)[0]
        return tuple(_coerce(f"{where}[{i}]", v, item) for i, v in enumerate(value))
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
    unknown = sorted(set(cfg.train.trackers) - set(TRACKERS))
    if unknown:
        raise ConfigError(f"train.trackers: {unknown[0]!r} is not a tracker; choose from {', '.join(TRACKERS)}")
    # what each teacher source's backend needs (its registry entry), and the sources' own keys
    from qcrd_ray.teacher.sources import resolve_sources  # it reads this module's classes: imported here

    resolve_sources(cfg)


def parse_override(text: str, expected: str = "section.key=value (e.g. train.rounds=3)",
                   least: int = 2) -> tuple[list[str], Any]:
    """``"train.rounds=3"`` → ``(["train", "rounds"], 3)``, ``"student.lora.r=8"`` → ``(["student", "lora", "r"],
    8)``; the value is parsed as YAML (``3``, ``0.5``, ``[a, b]``). ``expected`` and ``least`` (keys in the path)
    let ``qcrd sweep --set`` parse its own paths (``max_concurrent_trials=2``) the same way."""
    path, sep, value = text.partition("=")
    keys = path.strip().split(".")
    if not sep or len(keys) < least or not all(keys):
        raise ConfigError(f"--set {text!r}: expected {expected}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return keys, parsed


def apply_overrides(raw: Mapping, overrides: list[str] | tuple[str, ...]) -> dict:
    """A copy of the raw config ``raw`` with each ``section.key=value`` of ``--set`` applied (not yet validated)."""
    out = dict(raw)
    for text in overrides:
        out = set_path(out, *parse_override(text))
    return out


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
    return from_dict(apply_overrides(raw, overrides))


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


# --------------------------------------------------------------------------------------------------------------
# help: ``qcrd config explain``


@dataclass(frozen=True)
class KeyHelp:
    """One key of the config as ``qcrd config explain`` shows it; a section or group of keys has ``keys``."""

    key: str  # dotted: "train.lr", "student.lora.r"; a section: "train"
    help: str
    default: Any = None
    allowed: str = ""  # its type and choices or range: "float >= 0.0", "qcrd | dss | finetune"
    keys: tuple["KeyHelp", ...] = ()  # a section or group: its keys, plain keys first, then its groups

    @property
    def is_group(self) -> bool:
        return bool(self.keys)


_TYPE_NAMES = {str: "str", int: "int", float: "float", bool: "true | false", tuple: "list of str", dict: "mapping",
               tuple[dict, ...]: "list of mappings"}


def _allowed(f: dataclasses.Field, annotation: Any) -> str:
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    name = _TYPE_NAMES.get(base, getattr(base, "__name__", str(base)))
    choices, lo, hi = f.metadata.get("choices"), f.metadata.get("lo"), f.metadata.get("hi")
    if choices:
        text = " | ".join(map(str, choices))
    elif lo is not None and hi is not None:
        text = f"{name} in [{lo}, {hi}]"
    elif lo is not None:
        text = f"{name} >= {lo}"
    elif hi is not None:
        text = f"{name} <= {hi}"
    else:
        text = name
    return text + (" or null" if optional else "")


def _describe_group(name: str, cls: type, help: str) -> KeyHelp:
    hints = typing.get_type_hints(cls)
    keys, groups = [], []
    for f in dataclasses.fields(cls):
        key, annotation = f"{name}.{f.name}" if name else f.name, hints[f.name]
        if dataclasses.is_dataclass(annotation):
            groups.append(_describe_group(key, annotation, f.metadata.get("help", "")))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            keys.append(KeyHelp(key, f.metadata.get("help", ""), default, _allowed(f, annotation)))
    return KeyHelp(name, help, keys=tuple(keys + groups))


def describe(key: str | None = None) -> KeyHelp:
    """The help of ``key``: one key (``"train.lr"``), a section (``"train"``) or a group (``"student.lora"``) with
    its keys, or, with no key, the whole config (a group named ``""`` holding the sections). An unknown key raises
    :class:`ConfigError` naming the allowed ones, as loading a config does."""
    node = _describe_group("", Config, "the configuration: defaults <- --config FILE <- --set section.key=value")
    if not key:
        return node
    parts = key.strip().split(".")
    for depth in range(len(parts)):
        where = ".".join(parts[: depth + 1])
        if not node.is_group:
            raise ConfigError(f"unknown key {key}; {node.key} is a key, not a section")
        found = next((k for k in node.keys if k.key == where), None)
        if found is None:
            names = sorted(k.key.rsplit(".", 1)[-1] for k in node.keys)
            if depth == 0:
                raise ConfigError(f"unknown section '{parts[0]}'; allowed sections: "
                                  f"{', '.join(k.key for k in node.keys)}")
            raise ConfigError(f"unknown key {where}; allowed keys in '{node.key}': {', '.join(names)}")
        node = found
    return node
