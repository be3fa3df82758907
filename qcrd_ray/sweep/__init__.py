"""`qcrd sweep`: a grid (and random search) of full teach → train → eval trials, run as one ``ray.tune.Tuner``
(docs/design.md, "Sweeps").

A sweep file (sweeps/*.yaml) holds a base config, a ``grid`` of ``section.key: [values]`` (every combination is a
trial) and optionally ``random`` keys drawn ``num_samples`` times per grid point. Each trial runs
``pipeline.run_pipeline`` for its one method in ``SWEEP/trials/<trial>``; trials whose teacher settings agree share
one teacher output (``SWEEP/teachers/<key>``). An interrupted sweep continues with the same command.

One module per responsibility, importing only downwards (spec ← stats ← output ← rescore, tune):

- :mod:`.spec`: the sweep file: parsing, ``--set``, validation, grid expansion, trial names and configs (pure).
- :mod:`.stats`: means, paired differences with t intervals, pairs for a half width, cell tables (pure).
- :mod:`.output`: results.csv/.md, summary.md, best.yaml, accuracy.png and differences.png.
- :mod:`.rescore`: ``--rescore-valid N``, the finished trials scored again on fresh valid problems (no Ray).
- :mod:`.tune`: the Ray Tune shell: the trial, the trainable, ``Tuner``/``Tuner.restore`` and the console callback.

This package imports nothing itself, so ``qcrd sweep`` reads and checks a sweep file before Ray is imported.
"""
