"""The Ray actors of a training run: the SnapshotStore (lagged student snapshots) and the negative samplers.

They wire the torch-only method (``qcrd_ray/qcrd/``: losses, D, the step) and the student families
(``qcrd_ray/students/``) to Ray; nothing under ``qcrd_ray/qcrd/`` imports Ray.
"""
