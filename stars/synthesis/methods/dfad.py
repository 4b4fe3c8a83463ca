"""DFAD (Fang et al., "Data-Free Adversarial Distillation", 2019): an adversarial generator
maximizing the teacher-student L1 discrepancy; its config is
:class:`stars.synthesis.methods.DFADSynthesis`."""

from __future__ import annotations

from torch import Tensor

from stars.synthesis.synthesizers import PersistentGeneratorSynthesizer

__all__ = ["DFADSynthesizer"]


class DFADSynthesizer(PersistentGeneratorSynthesizer):
    """DFAD: a persistent generator trained ``g_steps`` times per call to maximize
    ``mean |t - s|`` (``-dfad`` is minimized) (+ bn + oh on sampled labels) + STARS."""

    def _labels(self) -> Tensor:
        return self.ctx.labels(self.ctx.batch_size)
