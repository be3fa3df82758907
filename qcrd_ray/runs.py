"""The run layout: the one place that knows where every artifact of a run lives, and how a path given to
``qcrd eval`` / ``qcrd serve`` / ``serve run`` is resolved to a model and the config it was trained with.

::

    RUN/config.yaml                      the resolved config of the run (train.method is per method, below)
    RUN/teacher/                         teacher shards, summary.json, rejects.jsonl, errors.jsonl
    RUN/<method>/train/                  config.yaml, checkpoints/, snapshots/, init_model/, metrics.jsonl,
                                         tensorboard/, negatives.jsonl, environment.jsonl
    RUN/<method>/model/                  the final student (HF format) + discriminator.pt
    RUN/<method>/adapter/                a LoRA student's adapter alone (model/ holds it merged)
    RUN/<method>/eval/<split>-<mode>/    predictions.jsonl, metrics.json
    RUN/report.md, RUN/figures/, RUN/logs/qcrd.log

Paths are strings joined with ``storage.join``, so a run root is a local path or a URI (``s3://bucket/run``)
with the same layout. The layout classes never touch a filesystem; :func:`resolve_model` does, through
``qcrd_ray.storage`` (the driver reads a run's config from the URI; a model on storage is fetched by whoever
loads it, with ``storage.download_dir``).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from dataclasses import dataclass

import yaml

from qcrd_ray import storage
from qcrd_ray.config import Config, ConfigError, from_dict
from qcrd_ray.methods import METHODS


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (``s3://b/run`` + ``teacher`` → ``s3://b/run/teacher``; a
    URI's query string stays at the end)."""
    return storage.join(str(base), *parts)


def _dirname(path: str) -> str:
    head, sep, query = path.partition("?") if storage.is_uri(path) else (path, "", "")
    return posixpath.dirname(head.rstrip("/")) + sep + query


def _basename(path: str) -> str:
    return storage.basename(path)


def _normalize(path: str) -> str:
    """An absolute local path, made lexically (``os.path.abspath``): a symlinked directory keeps its place in
    the run rather than being followed to wherever it points. URIs are kept as given (less a trailing ``/``)."""
    path = str(path)
    if storage.is_uri(path):
        head, sep, query = path.partition("?")
        return head.rstrip("/") + sep + query
    return os.path.abspath(path)


@dataclass(frozen=True)
class MethodLayout:
    """``RUN/<method>``: one method's training, final model and evaluations."""

    root: str

    @classmethod
    def at(cls, path: str) -> "MethodLayout":
        """The layout at ``path`` made absolute, so Ray workers with another working directory find it."""
        return cls(_normalize(path))

    @property
    def name(self) -> str:
        return _basename(self.root)

    @property
    def train(self) -> str:
        return join(self.root, "train")

    @property
    def train_config(self) -> str:
        return join(self.train, "config.yaml")

    @property
    def checkpoints(self) -> str:
        return join(self.train, "checkpoints")

    @property
    def snapshots(self) -> str:
        return join(self.train, "snapshots")

    @property
    def init_model(self) -> str:
        return join(self.train, "init_model")

    @property
    def metrics(self) -> str:
        return join(self.train, "metrics.jsonl")

    @property
    def environment(self) -> str:
        return join(self.train, "environment.jsonl")  # the machine and install of each start (provenance.py)

    @property
    def tensorboard(self) -> str:
        return join(self.train, "tensorboard")

    @property
    def negatives(self) -> str:
        return join(self.train, "negatives.jsonl")

    @property
    def train_rejects(self) -> str:
        return join(self.train, "rejects.jsonl")

    @property
    def model(self) -> str:
        return join(self.root, "model")

    @property
    def adapter(self) -> str:
        """A LoRA student's adapter alone (``model`` holds it merged)."""
        return join(self.root, "adapter")

    @property
    def discriminator(self) -> str:
        return join(self.model, "discriminator.pt")

    def eval(self, split: str, mode: str) -> str:
        return join(self.root, "eval", f"{split}-{mode}")


@dataclass(frozen=True)
class RunLayout:
    """``RUN``: the shared teacher output, one :class:`MethodLayout` per method, the report and the logs."""

    root: str

    @classmethod
    def at(cls, path: str) -> "RunLayout":
        """The layout at ``path`` made absolute, so Ray workers with another working directory find it."""
        return cls(_normalize(path))

    @property
    def config(self) -> str:
        return join(self.root, "config.yaml")

    @property
    def teacher(self) -> str:
        return join(self.root, "teacher")

    @property
    def teacher_summary(self) -> str:
        return join(self.teacher, "summary.json")

    @property
    def report(self) -> str:
        return join(self.root, "report.md")

    @property
    def figures(self) -> str:
        return join(self.root, "figures")

    @property
    def logs(self) -> str:
        return join(self.root, "logs")

    @property
    def log_file(self) -> str:
        return join(self.logs, "qcrd.log")

    def method(self, name: str) -> MethodLayout:
        return MethodLayout(join(self.root, name))


# ----------------------------------------------------------------------------------------------------------
# resolving a path given by a user (local filesystem calls live here, not in the layout classes)


@dataclass(frozen=True)
class ResolvedModel:
    model_dir: str  # holds config.json (HF format)
    config: Config | None  # the config it was trained with (train.method set); None for a bare HF directory
    method: MethodLayout | None  # where its eval outputs go; None for a bare HF directory
    run: RunLayout | None  # the `qcrd run` it belongs to, if any

    @property
    def name(self) -> str:
        """What the served model is called: the run's name for a method of a run, else the directory's."""
        if self.run is not None:
            return f"{_basename(self.run.root)}/{self.method.name}"
        where = self.method.root if self.method is not None else self.model_dir
        return _basename(where)


def _is_model(path: str) -> bool:
    """A Hugging Face model folder, or a LoRA adapter folder (``adapter_config.json``, loaded on its base)."""
    return storage.is_file(join(path, "config.json")) or storage.is_file(join(path, "adapter_config.json"))


def _is_file(path: str) -> bool:
    return storage.is_file(path)


def load_run_config(location: storage.Location) -> Config:
    """The config a run was made with (``RUN/config.yaml``, ``RUN/<method>/train/config.yaml``), from a local path
    or a URI, validated; every reader of a run's config goes through here (docs/design.md, "Run directory")."""
    try:
        raw = yaml.safe_load(storage.read_text(location)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{location}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{location}: expected a mapping of sections at the top level")
    return from_dict(raw)


# train.* keys a run may be continued under with other values (see check_same_config)
_INVOCATION_KEYS = ("method", "experiment", "run_name")


def check_same_config(config_file: storage.Location, cfg: Config, what: storage.Location) -> None:
    """Write ``cfg`` to ``config_file`` where there is none yet, else refuse (ConfigError) to continue ``what`` (a
    run, or one method's training) under a config other than the one it was made with: its stored outputs
    (teacher shards, checkpoints, the data order a resumed step number stands for) belong to that config."""
    if not storage.exists(config_file):
        storage.write_text(config_file, cfg.to_yaml())
        return
    old = load_run_config(config_file).to_dict()
    new = cfg.to_dict()
    # The method list and the tracker names are properties of the invocation, not of the stored outputs: a run
    # directory copied into another sweep (which names its tracker runs after itself) is the same run.
    for resolved in (old, new):
        for key in _INVOCATION_KEYS:
            resolved["train"].pop(key)
    changed = [f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
    if changed:
        raise ConfigError(
            f"{what} was made with a different config ({', '.join(changed[:6])}"
            f"{' …' if len(changed) > 6 else ''} differ); pass the same config to continue it or choose a new --out"
        )


def _trained_methods(run: RunLayout) -> list[str]:
    return [m for m in METHODS if _is_model(run.method(m).model)]


def _method_dir(root: str) -> ResolvedModel:
    """A directory holding ``model/``: a method of a `qcrd run`, a `qcrd train --out` directory, or a run
    directory that holds its model directly (config.yaml beside model/)."""
    method = MethodLayout(root)
    parent = RunLayout(_dirname(root))
    if method.name in METHODS and _is_file(parent.config):  # RUN/<method> of a `qcrd run`
        cfg = load_run_config(parent.config).replace(train={"method": method.name})
        return ResolvedModel(method.model, cfg, method, parent)
    for config in (method.train_config, join(root, "config.yaml")):
        if _is_file(config):
            return ResolvedModel(method.model, load_run_config(config), method, None)
    return ResolvedModel(method.model, None, method, None)


def resolve_model(path: str) -> ResolvedModel:
    """A run directory, a method directory (``RUN/<method>``), its ``model/`` or (LoRA) ``adapter/``, or a bare
    Hugging Face model or adapter directory, each a local path or a URI (``s3://bucket/run``, ``s3://bucket/run/qcrd``, ``s3://bucket/model``)
    → the model directory (a URI stays a URI) and the config it was trained with. ``FileNotFoundError`` naming
    what was looked for when there is no model, or when a model on storage lacks its completeness marker (its
    upload is still running or was interrupted)."""
    resolved = _find_model(path)
    if storage.is_uri(resolved.model_dir) and not storage.is_complete(resolved.model_dir):
        raise FileNotFoundError(
            f"{resolved.model_dir} is incomplete (no {storage.COMPLETE_MARKER}): its upload is still running or "
            "was interrupted; wait for training to finish uploading it, or rerun the step that writes it")
    return resolved


def _find_model(path: str) -> ResolvedModel:
    root = _normalize(path)
    if _is_model(join(root, "model")):
        return _method_dir(root)
    if _is_model(root):
        parent = _dirname(root)
        if _basename(root) == "adapter" and _is_model(join(parent, "model")):  # RUN/<method>/adapter (LoRA)
            return dataclasses.replace(_method_dir(parent), model_dir=root)
        if _basename(root) == "model" and (
            _is_file(join(parent, "train", "config.yaml")) or _is_file(join(parent, "config.yaml"))
            or _is_file(RunLayout(_dirname(parent)).config)
        ):
            return _method_dir(parent)
        return ResolvedModel(root, None, None, None)
    run = RunLayout(root)
    if _is_file(run.config):
        trained = _trained_methods(run)
        cfg = load_run_config(run.config)
        if cfg.train.method in trained:
            return _method_dir(run.method(cfg.train.method).root)
        if len(trained) == 1:
            return _method_dir(run.method(trained[0]).root)
        if trained:
            raise FileNotFoundError(
                f"{path}: a run with several trained methods ({', '.join(trained)}); name one, e.g. "
                f"{join(str(path), trained[-1])}")
        raise FileNotFoundError(f"{path}: a run directory, but no method has a trained model yet "
                                f"(expected {run.method(cfg.train.method).model}/config.json)")
    raise FileNotFoundError(
        f"{path}: no model found (expected a run directory RUN, a method directory RUN/<method> with "
        f"model/config.json, or an HF model directory with config.json)")
