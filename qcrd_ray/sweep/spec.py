"""The sweep file, pure: parsing with ``--set``, validation, grid expansion, trial names, trial configs and the
teacher-sharing key (docs/design.md, "Sweeps").

A sweep file (sweeps/*.yaml) holds a base config (``base``, optionally over a ``config`` file), a ``grid`` of
``section.key: [values]`` (every combination is a trial), optionally ``random`` keys drawn ``num_samples`` times
per grid point (``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{choice: [...]}``) and ``variants``
(named override sets: one more axis). Every key and value a trial may get is checked as config when the file is
loaded, so a typo fails before anything runs. An optional ``decision`` names a pre-registered rule's arms
(sweep/decision.py), checked against the sweep's arms too.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from qcrd_ray.config import Config, ConfigError, from_dict, merge, parse_override, set_path
from qcrd_ray.data.tasks import BUILTIN_TASKS

SPLITS = ("valid", "test")  # valid chooses, test reports
RANDOM_KINDS = ("uniform", "loguniform", "choice")
METRICS = ("predict", "explain")
_DOTTED_FIELDS = ("grid", "random", "variants")  # their keys are "section.key" strings, not nested sections
_MAPPING_FIELDS = ("base", "grid", "random", "variants", "decision")


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: dict = field(default_factory=dict)  # config sections, as in a qcrd config file
    grid: dict = field(default_factory=dict)  # "section.key" -> list of values
    random: dict = field(default_factory=dict)  # "section.key" -> {uniform|loguniform|choice: ...}
    # named sets of "section.key: value" (an ablation's rows): one more grid axis, "variant"
    variants: dict = field(default_factory=dict)
    num_samples: int = 1  # random draws per grid point
    metric: str = "predict"  # the valid accuracy that picks the best cell
    compare_on: str = "train.method"  # the grid key whose baseline value the paired differences are taken to
    baseline: str = "dss"
    pair_by: str = "train.seed"  # the key whose values pair trials of two methods
    plot_x: str = "teacher.noise"  # x axis of accuracy.png (a grid key)
    max_concurrent_trials: int = 1
    # the pre-registered rule (sweep/decision.py): {control: the headroom arm, methods: [arms it judges],
    # min_effect: 0.02}; its verdicts go into rescored-valid-N.md, the study's primary score
    decision: dict = field(default_factory=dict)
    # the trial driver's own CPU (Tune refuses an empty request); Train's workers ask for theirs (train.*)
    trial_cpus: float = 0.01


def _set(raw: dict, dotted: str, value) -> dict:
    return set_path(raw, dotted.split("."), value)


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """``qcrd sweep --set``: ``grid.teacher.noise=[0.3]`` (a grid or random entry: the field, then the config
    key), ``variants.qcrd.loss.delta=2`` (one key of a variant: the field, the variant's name, the config key;
    ``variants.plain={train.method: dss}`` sets a whole variant), ``base.train.rounds=4`` (a base config value),
    ``max_concurrent_trials=2`` (a sweep field). Parsed as ``--set`` of the other commands
    (``config.parse_override``: values are YAML)."""
    for text in overrides:
        keys, value = parse_override(text, "field[.section.key]=value (e.g. grid.teacher.noise=[0.3])", least=1)
        head, rest = keys[0], keys[1:]
        if head == "variants" and len(rest) > 1:
            keys = [head, rest[0], ".".join(rest[1:])]
        elif head in _DOTTED_FIELDS and rest:
            keys = [head, ".".join(rest)]
        elif head == "base" and len(rest) < 2:
            raise ConfigError(f"--set {text!r}: expected base.section.key=value")
        elif head != "base" and rest:
            raise ConfigError(f"--set {text!r}: only base, grid, random and variants take a key after the field")
        raw = set_path(raw, keys, value)
    return raw


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """A sweep file (with ``--set`` overrides), validated: every trial's config (each grid point, each random
    key's range ends) is built now, so a typo or a combination the config refuses fails before anything runs,
    naming the key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    base_overrides = [o for o in overrides if o.strip().startswith("base.")]
    raw = apply_overrides(raw, [o for o in overrides if o not in base_overrides])
    allowed = {f for f in SweepSpec.__dataclass_fields__}
    unknown = sorted(set(raw) - allowed - {"config"})
    if unknown:
        raise ConfigError(f"{p}: unknown sweep key {unknown[0]!r}; allowed: {', '.join(sorted(allowed | {'config'}))}")
    for name in _MAPPING_FIELDS:  # `grid:` with nothing under it is YAML's null
        if raw.get(name) is None:
            raw[name] = {}
        elif not isinstance(raw[name], dict):
            raise ConfigError(f"{p}: {name}: expected a mapping, got {raw[name]!r}")
    base = raw["base"]
    if raw.get("config"):  # a config file the base overrides, relative to the sweep file
        base_file = (p.parent / raw["config"]).resolve()
        if not base_file.is_file():
            raise ConfigError(f"{p}: config {raw['config']!r} not found (looked for {base_file})")
        base = merge(yaml.safe_load(base_file.read_text()) or {}, base)
    base = apply_overrides({"base": base}, base_overrides)["base"]  # over the config file's values too
    spec = SweepSpec(**{**{k: v for k, v in raw.items() if k != "config"}, "base": base,
                        "name": raw.get("name") or p.stem})
    for name, overrides in spec.variants.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"{p}: variants.{name}: expected a mapping of section.key: value")
        for key, value in overrides.items():
            if not isinstance(key, str) or key.count(".") != 1:
                raise ConfigError(f"{p}: variants.{name}: key {key!r}: expected section.key")
            from_dict(_set(base, key, value))
    if spec.variants and spec.compare_on not in axes(spec):  # without variants: no method axis, no differences
        raise ConfigError(f"{p}: compare_on {spec.compare_on!r} is not a grid key (nor 'variant')")
    for key, values in {**spec.grid, **spec.random}.items():
        if not isinstance(key, str) or key.count(".") != 1:
            raise ConfigError(f"{p}: sweep key {key!r}: expected section.key (e.g. teacher.noise)")
    for key, values in spec.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{p}: grid.{key}: expected a non-empty list of values")
        for value in values:
            from_dict(_set(base, key, value))  # raises ConfigError naming section.key
    for key, dist in spec.random.items():
        _check_random(p, base, key, dist)
    for point in grid_points(spec):  # values that pass alone may not together (or with a variant's overrides)
        try:
            trial_config(spec, point)
        except ConfigError as e:
            raise ConfigError(f"{p}: trial {trial_name(point)}: {e}") from None
    if spec.metric not in METRICS:
        raise ConfigError(f"{p}: metric {spec.metric!r}: choose one of {', '.join(METRICS)}")
    if spec.num_samples < 1 or spec.max_concurrent_trials < 1:
        raise ConfigError(f"{p}: num_samples and max_concurrent_trials must be >= 1")
    if spec.num_samples > 1 and not spec.random:
        raise ConfigError(f"{p}: num_samples {spec.num_samples} draws random keys, and there are none: the samples "
                          f"would be one trial (one directory) run {spec.num_samples} times; to repeat a trial, "
                          f"put seeds in grid.train.seed")
    if spec.decision:
        _check_decision(spec, p)
    return spec


def _check_random(p: Path, base: dict, key: str, dist) -> None:
    """A random key's distribution: ``{choice: [values]}``, or ``{uniform|loguniform: [lo, hi]}`` with lo < hi
    (and lo > 0 for loguniform) on a float key: both ends are checked as that key's value."""
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in RANDOM_KINDS:
        raise ConfigError(f"{p}: random.{key}: expected one of {{{', '.join(RANDOM_KINDS)}: ...}}")
    kind, args = next(iter(dist.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{p}: random.{key}: choice: expected a non-empty list of values")
        for value in args:
            from_dict(_set(base, key, value))
        return
    numbers = isinstance(args, list) and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if not numbers or len(args) != 2 or not args[0] < args[1]:
        raise ConfigError(f"{p}: random.{key}: {kind}: expected [lo, hi], two numbers with lo < hi; got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"{p}: random.{key}: loguniform: lo must be > 0; got {args[0]!r}")
    for value in args:
        try:
            from_dict(_set(base, key, float(value)))  # Tune draws floats: an integer key refuses them
        except ConfigError as e:
            raise ConfigError(f"{p}: random.{key}: {kind} draws numbers between the ends ({e}); for an integer "
                              f"key use {{choice: [...]}}") from None


DECISION_KEYS = ("control", "methods", "min_effect")


def _check_decision(spec: SweepSpec, p: Path) -> None:
    d = spec.decision
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: decision: expected a mapping of {', '.join(DECISION_KEYS)}")
    arms = search_grid(spec).get(spec.compare_on, [])
    unknown = sorted(set(d) - set(DECISION_KEYS))
    if unknown:
        raise ConfigError(f"{p}: decision.{unknown[0]}: unknown; allowed: {', '.join(DECISION_KEYS)}")
    methods = d.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"{p}: decision.methods: expected a non-empty list of {spec.compare_on} values")
    for arm in [d.get("control"), *methods]:
        if arm not in arms or arm == spec.baseline:
            raise ConfigError(f"{p}: decision: {arm!r} is not a {spec.compare_on} of the sweep other than the "
                              f"baseline {spec.baseline!r} (choose from {', '.join(map(str, arms))})")
    min_effect = d.get("min_effect", 0.02)
    if not isinstance(min_effect, (int, float)) or not 0 < min_effect < 1:
        raise ConfigError(f"{p}: decision.min_effect: expected an accuracy difference in (0, 1), e.g. 0.02")


SWEEP_FILE = "sweep.yaml"  # the sweep directory's record of its spec
TRIAL_FIELDS = ("name", "base", "grid", "random", "variants", "num_samples")  # what the trials and their configs are


def spec_record(spec: SweepSpec) -> dict:
    """The spec as ``SWEEP_FILE`` records it (plain YAML types)."""
    return json.loads(json.dumps(asdict(spec)))


def check_recorded(spec: SweepSpec, out: str | Path, fields: tuple[str, ...], what: str) -> None:
    """Refuse ``out`` when its ``SWEEP_FILE`` records other values for ``fields`` than ``spec`` has (``what``
    says what would go wrong); a directory without one records nothing yet."""
    spec_file = Path(out, SWEEP_FILE)
    if not spec_file.exists():
        return
    before, now = yaml.safe_load(spec_file.read_text()) or {}, spec_record(spec)
    differ = [f for f in fields if before.get(f) != now.get(f)]
    if differ:
        raise ConfigError(f"{out} holds another sweep: {spec_file} records other {', '.join(differ)} than this "
                          f"sweep file with its --set options; {what}")


def search_grid(spec: SweepSpec) -> dict:
    """The grid search's keys and values: "variant" (the variants' names, when there are any), then the grid."""
    return {"variant": list(spec.variants), **spec.grid} if spec.variants else dict(spec.grid)


def trial_count(spec: SweepSpec) -> int:
    """How many trials the sweep runs: every grid point, ``num_samples`` times."""
    return len(grid_points(spec)) * spec.num_samples


def axes(spec: SweepSpec) -> list[str]:
    """The keys a trial's row is labelled with: "variant" (when there are variants), the grid, random keys."""
    return list(search_grid(spec)) + list(spec.random)


def _rationale_column(split: str, check: str) -> str:
    return f"{split}_rationale_{check}"


def rationale_columns() -> dict[str, tuple[str, str]]:
    """Every built-in task's rationale-check columns (``TaskSpec.rationale_checks``), each with its (split, check),
    in row order. A column holds the share of the trial's explain-mode rationales on the split that pass the check."""
    checks = dict.fromkeys(c for task in BUILTIN_TASKS.values() for c in task.rationale_checks)
    return {_rationale_column(s, c): (s, c) for s in SPLITS for c in checks}


def rationale_scores(split: str, checks: dict) -> dict[str, float]:
    """A trial row's rationale columns for one split, from evaluate's ``rationale_checks`` ({check: {share, n}})."""
    return {_rationale_column(split, name): c["share"] for name, c in checks.items()}


def row_keys(spec: SweepSpec) -> list[str]:
    """A trial's row (results.csv's columns): its name, axes, teacher accuracy, time, the machine it trained on
    (``provenance.machines``), accuracy per split and mode, then each built-in task's rationale checks per split
    (empty for a task without them)."""
    return (["trial", *axes(spec), "teacher_accuracy", "wall_s", "machine"]
            + [f"{s}_{m}" for s in SPLITS for m in METRICS] + list(rationale_columns()))


def grid_points(spec: SweepSpec) -> list[dict]:
    """Every combination of the grid's values (variants first), in file order (the last key varies fastest)."""
    keys = search_grid(spec)
    return [dict(zip(keys, values)) for values in itertools.product(*keys.values())]


def trial_name(point: dict) -> str:
    """A stable directory name for a trial: ``method=qcrd,noise=0.3,seed=1`` (the key's last part; a sampled
    float is rounded). A restored or rerun trial finds its own run directory by it."""
    parts = []
    for key, value in point.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key.split('.')[-1]}={text}".replace("/", "_").replace(" ", ""))
    return ",".join(parts) or "base"


def trial_config(spec: SweepSpec, point: dict) -> Config:
    raw = spec.base
    for key, value in point.items():
        for k, v in (spec.variants[value].items() if key == "variant" else [(key, value)]):
            raw = _set(raw, k, v)
    raw = _set(raw, "train.experiment", spec.name)
    return from_dict(_set(raw, "train.run_name", trial_name(point)))


def teacher_key(cfg: Config) -> str:
    """Trials with the same key can share a teacher output: everything the teacher stage reads."""
    d = cfg.to_dict()
    data = {k: v for k, v in d["data"].items() if k != "eval_split"}
    text = json.dumps([data, d["teacher"], d["self_consistency"]], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]
