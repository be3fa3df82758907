"""What each training method is: one frozen spec per method, the only place that says so.

The method of a run is ``cfg.train.method``; every stage reads its spec through :func:`method_spec` instead of
comparing method names. A spec says whether the student learns the explain task at all, whether D and student
negatives are part of the method (each still subject to its ablation switch in ``cfg.loss``), how it is evaluated,
and the DDP setting its step needs. Its behaviour is registered under its name, one decorated function each (as
verl's ``@register_policy_loss``): the explain targets it trains on (``@register_targets``, qcrd/targets.py) and how
its step composes the loss (``@register_loss``, qcrd/step.py). A new method is a spec here plus those two functions
(or existing ones registered under its name) and its test; config.py's ``train.method`` choices read ``METHODS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qcrd_ray.config import Config


@dataclass(frozen=True)
class MethodSpec:
    name: str
    explains: bool  # the student is trained on the ``explain:`` task at all (else L_pred alone)
    uses_discriminator: bool  # D is part of the method; it exists when loss.quality_judge is also on
    uses_student_negatives: bool  # lagged-student negatives are part of the method (loss.negatives decides)
    eval_modes: tuple[str, ...]  # student modes worth evaluating: a label-only student has no explain task
    # DDP: a step may leave parameters without gradient (a batch without candidates skips D and the explain pass)
    find_unused_parameters: bool
    summary: str

    def needs_discriminator(self, cfg: "Config") -> bool:
        return self.uses_discriminator and cfg.loss.quality_judge

    def needs_student_negatives(self, cfg: "Config") -> bool:
        return self.uses_student_negatives and cfg.loss.negatives in ("student", "both")


FINETUNE = MethodSpec("finetune", explains=False, uses_discriminator=False, uses_student_negatives=False,
                      eval_modes=("predict",), find_unused_parameters=False,
                      summary="label only: L_pred on `predict: x`")
DSS = MethodSpec("dss", explains=True, uses_discriminator=False, uses_student_negatives=False,
                 eval_modes=("predict", "explain"), find_unused_parameters=False,
                 summary="distilling step-by-step: L_pred + loss.dss_lambda * CE of one teacher rationale")
QCRD = MethodSpec("qcrd", explains=True, uses_discriminator=True, uses_student_negatives=True,
                  eval_modes=("predict", "explain"), find_unused_parameters=True,
                  summary="QCRD: L_pred + quality-weighted contrastive rationale loss + discriminator loss")

SPECS: dict[str, MethodSpec] = {s.name: s for s in (FINETUNE, DSS, QCRD)}
METHODS: tuple[str, ...] = tuple(SPECS)


def method_spec(cfg_or_name: "Config | str") -> MethodSpec:
    """The spec of a method name, or of a config's ``train.method``."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.train.method
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; set train.method to one of {', '.join(METHODS)}") from None
