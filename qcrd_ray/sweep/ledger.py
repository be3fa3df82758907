"""A sweep's ledger (``qcrd sweep --ledger FILE``): its finished trials' rows, each under the hash of the config it
trained with, in a JSON-lines file kept where it outlives the sweep directory (an S3 URI, or a file committed
beside the study's docs). A trial whose config is in the ledger is taken from it instead of trained, so

- a sweep continues on a new cluster or a fresh checkout, whose sweep directory starts empty, and
- sweeps that share arms (one ledger for both: sweeps/ablation_v2.yaml and switches_v2.yaml share DSS, clean-DSS
  and QCRD) train each shared trial once, wherever its name and variant label differ.

The ledger holds scores, not models: ``--rescore-valid N`` adds each trial's ``valid<N>_predict`` to it, and reads
it back for a trial whose model is not in the sweep directory. Pure functions over records; the storage layer
reads and writes them. docs/design.md, "Sweeps"."""

from __future__ import annotations

import hashlib
import json

from qcrd_ray import storage
from qcrd_ray.config import Config
from qcrd_ray.sweep.spec import SweepSpec, axes, trial_config

# train.* keys that name tracker runs, not what is trained (the same keys a run directory ignores: pipeline.py)
_TRACKER_KEYS = ("experiment", "run_name")


def config_hash(cfg: Config) -> str:
    """What a trial's results are a function of (with the machine: the row's ``machine``): its whole config but
    the tracker names, which a sweep sets to its own name and the trial's."""
    d = cfg.to_dict()
    d["data"].pop("eval_split", None)  # the trial sets it per evaluation
    for key in _TRACKER_KEYS:
        d["train"].pop(key)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def read(location: str | None) -> dict[str, dict]:
    """The ledger's records by config hash (a later line wins); {} for none or no file yet."""
    return {r["config"]: r for r in storage.read_jsonl(location)} if location else {}


def record(sweep: str, row: dict, labels: list[str], digest: str) -> dict:
    """A ledger line for a finished trial's ``row``: where it trained, and every score and fact of the row but
    its name and ``labels`` (the sweep's axes, which another sweep names its own way)."""
    return {"config": digest, "trained_in": f"{sweep}/{row['trial']}",
            "scores": {k: v for k, v in row.items() if k != "trial" and k not in labels}}


def row_from(entry: dict, trial: str, point: dict) -> dict:
    """A recorded trial's row under this sweep's name and labels for it; ``taken_from`` says where it trained (the
    console line shows it; results.csv keeps the row's own columns)."""
    return {"trial": trial, **point, **entry["scores"], "taken_from": entry["trained_in"]}


def merge(location: str, records: list[dict]) -> int:
    """Add ``records`` to the ledger at ``location``; a config already there keeps its first ``trained_in`` and
    gains the new scores (a rescore's column). Rewritten whole, sorted by ``trained_in`` so that a committed
    ledger's diffs stay small; one writer at a time (the sweep's driver). Returns how many configs it holds."""
    entries = read(location)
    for r in records:
        old = entries.get(r["config"])
        entries[r["config"]] = ({**old, "scores": {**old["scores"], **r["scores"]}} if old else r)
    storage.write_jsonl(location, sorted(entries.values(), key=lambda e: e["trained_in"]))
    return len(entries)


def add_rows(location: str, spec: SweepSpec, rows: list[dict]) -> int:
    """Add a sweep's finished trials' rows to the ledger at ``location``; returns how many configs it holds."""
    labels = axes(spec)
    return merge(location, [record(spec.name, row, labels, config_hash(trial_config(spec, {k: row[k] for k in labels})))
                            for row in rows])
