"""An alias kept for sweeps started before ``qcrd_ray.sweep.tune`` held the sweep's console callback: their
``tune/tuner.pkl`` names ``qcrd_ray.sweep_console.TrialLines``, and ``Tuner.restore`` unpickles it by that path.
New code imports from ``qcrd_ray.sweep.tune``."""

from qcrd_ray.sweep.tune import TrialLines

__all__ = ["TrialLines"]
