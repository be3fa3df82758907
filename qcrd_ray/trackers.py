"""Experiment trackers beside TensorBoard: MLflow and Weights & Biases (``train.trackers``).

Rank 0's training loop opens one tracker run per method training (``RankZeroLog``, qcrd_ray/train/loop.py) and
sends it every metrics line it writes to ``metrics.jsonl`` (each loss term, s_pos / s_neg, lr, throughput, the
round timings); the eval results are added to the same run afterwards (:func:`log_results`). The run's id is
kept in ``RUN/<method>/train/trackers.json``, so a resumed training and its evaluation continue one run. A sweep
sets ``train.experiment`` to its name and ``train.run_name`` to the trial's, so it makes one MLflow run per trial
under one experiment.

TensorBoard is always written by ``RankZeroLog`` (the run's own record); mlflow and wandb are imported only when
listed in ``train.trackers``. The trackers are a registry (`TRACKERS`, ``@register_tracker``), whose names are
``train.trackers``' choices: this module imports nothing heavy at the top, since config.py reads it.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qcrd_ray.config import Config

# tracker name -> its class, ``cls(cfg, run_name, run_id or None, method_dir)`` with ``run_id``, ``log(metrics,
# step)``, ``log_final(results)`` and ``close()``; None: written by the training loop itself (TensorBoard)
TRACKERS: dict[str, type | None] = {"tensorboard": None}


def register_tracker(name: str):
    """Decorator: the class is the tracker ``name`` of ``train.trackers``."""

    def register(cls):
        TRACKERS[name] = cls
        return cls

    return register


_SKIP = ("step", "time")  # the x axis and the wall clock are not series


def _series(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _ids_file(method_dir: str) -> str:
    from qcrd_ray import storage

    return storage.join(method_dir, "train", "trackers.json")


def _read_ids(method_dir: str) -> dict:
    from qcrd_ray import storage

    return storage.read_json(_ids_file(method_dir)) or {}


def _flat_params(cfg: Config) -> dict[str, str]:
    return {f"{s}.{k}": str(v)[:250] for s, section in cfg.to_dict().items() for k, v in section.items()}


@register_tracker("mlflow")
class MlflowTracker:
    def __init__(self, cfg: Config, run_name: str, run_id: str | None, method_dir: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.train.tracking_uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(cfg.train.experiment)
            experiment_id = (experiment.experiment_id if experiment else
                             self.client.create_experiment(cfg.train.experiment))
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in sorted(_flat_params(cfg).items())]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=params[i:i + 100])
        self.run_id = run_id

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        series = [Metric(k, v, now, step) for k, v in _series(metrics).items()]
        if series:
            self.client.log_batch(self.run_id, metrics=series)

    def log_final(self, results: dict) -> None:
        self.log(results, 0)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


@register_tracker("wandb")
class WandbTracker:
    def __init__(self, cfg: Config, run_name: str, run_id: str | None, method_dir: str):
        import wandb

        local_dir = _wandb_dir(method_dir)
        os.makedirs(local_dir, exist_ok=True)
        self.run = wandb.init(project=cfg.train.experiment, name=run_name, id=run_id, resume="allow",
                              mode=cfg.train.wandb_mode, dir=local_dir, config=cfg.to_dict(), reinit="create_new")
        self.run_id = self.run.id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_series(metrics), step=step)

    def log_final(self, results: dict) -> None:
        self.run.summary.update(_series(results))  # W&B drops a step below the run's last one

    def close(self) -> None:
        self.run.finish()


def _wandb_dir(method_dir: str) -> str:
    """W&B writes through the local filesystem: the run's own train folder, or a node cache for a URI run."""
    from qcrd_ray import storage

    if storage.is_uri(method_dir):
        return os.path.join(storage.cache_dir("wandb"), storage.basename(method_dir))
    return os.path.join(method_dir, "train")


def open_trackers(cfg: Config, method_dir: str) -> list:
    """The configured trackers (other than TensorBoard) for this method's training, continuing its runs."""
    from qcrd_ray import storage

    wanted = [t for t in cfg.train.trackers if TRACKERS[t] is not None]
    if not wanted:
        return []
    ids = _read_ids(method_dir)
    name = cfg.train.run_name or storage.basename(os.path.dirname(method_dir.rstrip("/"))) + "/" + cfg.train.method
    out = []
    for kind in wanted:
        out.append(TRACKERS[kind](cfg, name, ids.get(kind), method_dir))
    ids.update({kind: t.run_id for kind, t in zip(wanted, out)})
    storage.write_text(_ids_file(method_dir), json.dumps(ids))
    return out


def log_results(cfg: Config, method_dir: str, results: dict) -> None:
    """Add eval results (``{"valid_predict": 0.41, ...}``) to the method's tracker runs, then close them."""
    for tracker in open_trackers(cfg, method_dir):
        tracker.log_final(results)
        tracker.close()
