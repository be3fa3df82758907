"""Teacher sources: which backend, with which settings, draws which of the K samples of every question.

A config without ``teacher.sources`` has one source: the top-level ``teacher.*`` keys, drawing all K samples (so a
single-teacher run is exactly what it always was). ``teacher.sources: [{name, backend, weight, ...}]`` mixes
several: each entry's other keys override the top-level teacher keys for that source alone (its model, temperature,
noise, endpoint, pool sizes...; not ``k`` or ``shard_rows``, which belong to the whole output), and what it does
not set it inherits.

Which samples a source draws is the same for every question, and a pure function of the config:

- counts: source s draws ``n_s`` of the K samples, K·w_s/Σw rounded by largest remainder (the floors, then one
  more to each of the largest fractional parts, ties to the source listed first), so the counts sum to K and a
  weight is the source's share of the samples up to that rounding; a source that would draw none is refused;
- indices: in the order the sources are listed, contiguous: the first source draws sample indices 0..n_0-1, the
  next n_0..n_0+n_1-1, and so on (so the first listed source's sample 0 is the one DSS's ``first`` rule takes).

A sample's seed is still ``sample_seed(source's teacher.seed, example id, sample index)``: sample indices are
global, so two sources of one backend never draw the same sample. Self-consistency votes over the union of the K.
Pure (no Ray); config validation calls `resolve_sources`, so every error here is a ConfigError naming the entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qcrd_ray.errors import ConfigError
from qcrd_ray.teacher.backends import Backend, check_serves, get_backend

if TYPE_CHECKING:
    from qcrd_ray.config import Config

# keys of a source entry that are not teacher keys
ENTRY_KEYS = ("name", "backend", "weight")
# teacher keys that belong to the whole output, not to one source
SHARED_KEYS = ("k", "shard_rows", "sources")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Source:
    name: str
    weight: float
    backend: Backend  # its registry entry
    cfg: "Config"  # the run's config with this source's teacher settings; its teacher.k is len(indices)
    indices: tuple[int, ...]  # the sample indices (of 0..K-1) it draws for every question


def sample_counts(k: int, weights: list[float]) -> list[int]:
    """Samples per question of each source: ``k · w / Σw`` by largest remainder (ties to the earlier source)."""
    total = sum(weights)
    quotas = [k * w / total for w in weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: k - sum(counts)]:
        counts[i] += 1
    return counts


def resolve_sources(cfg: "Config") -> list[Source]:
    """The sources of ``cfg`` with their settings and sample indices; ConfigError for an entry that cannot be."""
    t = cfg.teacher
    if not t.sources:
        entry = get_backend(t.backend)
        problem = entry.problem(t.k, t.model)
        if problem:
            key, why = problem
            raise ConfigError(f"teacher.{key}: {why}" + (f"; set teacher.k={entry.fixed_k}" if key == "k" else ""))
        return [Source(t.backend, 1.0, entry, cfg, tuple(range(t.k)))]

    names, weights = [], []
    for i, raw in enumerate(t.sources):
        where = f"teacher.sources[{i}]"
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{where}.name: required, letters, digits, '_', '.' or '-' (got {name!r})")
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} names two sources; give each its own")
        shared = sorted(set(raw) & set(SHARED_KEYS))
        if shared:
            raise ConfigError(f"{where}.{shared[0]}: set for the whole teacher output (teacher.{shared[0]}), not "
                              "per source")
        weight = raw.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"{where}.weight: a number > 0 (its share of the samples), got {weight!r}")
        names.append(name)
        weights.append(float(weight))

    counts = sample_counts(t.k, weights)
    sources, start = [], 0
    base = {key: value for key, value in cfg.to_dict()["teacher"].items() if key not in SHARED_KEYS}
    for i, (raw, name, weight, n) in enumerate(zip(t.sources, names, weights, counts)):
        where = f"teacher.sources[{i}] ({name})"
        if n == 0:
            raise ConfigError(f"{where}: weight {weight:g} gets none of the teacher.k={t.k} samples per question; "
                              "raise its weight or teacher.k")
        overrides = {key: value for key, value in raw.items() if key not in ENTRY_KEYS}
        try:
            entry = get_backend(raw.get("backend", t.backend))
        except ValueError as e:
            raise ConfigError(f"teacher.sources[{i}].backend: {e}") from None
        problem = entry.problem(n, overrides.get("model", t.model))
        if problem:
            key, why = problem
            hint = (f"; it draws {n} of the K={t.k} samples per question: set the weights so it draws "
                    f"{entry.fixed_k}") if key == "k" else f"; set its {key}"
            raise ConfigError(f"{where}: {why}{hint}")
        try:
            source_cfg = cfg.replace(teacher={**base, **overrides, "backend": entry.name, "k": n, "sources": []})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        sources.append(Source(name, weight, entry, source_cfg, tuple(range(start, start + n))))
        start += n
    return sources


def source_of_index(sources: list[Source]) -> dict[int, str]:
    """sample index -> the name of the source that draws it."""
    return {i: s.name for s in sources for i in s.indices}


def check_teacher(cfg: "Config") -> None:
    """`check_serves` for every teacher source of ``cfg`` (one, unless teacher.sources lists several)."""
    several = bool(cfg.teacher.sources)
    for i, source in enumerate(resolve_sources(cfg)):
        where = f"teacher.sources[{i}].backend" if several else "teacher.backend"
        check_serves(source.backend.name, cfg.data.task, cfg.data.answer_type, where)
