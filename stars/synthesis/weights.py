"""The weights of a synthesis method's own terms in the generator objective (torch-free: the
methods' configs in :mod:`stars.synthesis.methods` build them)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TermWeights"]


@dataclass(frozen=True)
class TermWeights:
    """Weights of the baseline terms (the STARS weights live in :class:`StarsConfig`)."""

    bn: float = 0.0
    oh: float = 0.0
    adv: float = 0.0
    """Fast/CMI masked KL (the generator maximizes the disagreement)."""
    dfad: float = 0.0
    """DFAD: the generator maximizes ``mean |t - s|``."""
    act: float = 0.0
    ie: float = 0.0
    tv_l1: float = 0.0
    tv_l2: float = 0.0
    l2: float = 0.0
    pseudo_labels: bool = False
    """DAFL: the class term uses the teacher's own argmax instead of sampled labels."""
