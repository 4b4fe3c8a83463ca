"""DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019): a generator
trained with one-hot (pseudo-label CE), activation and information-entropy terms; its config
is :class:`stars.synthesis.methods.DAFLSynthesis`."""

from __future__ import annotations

import torch
from torch import Tensor

from stars.synthesis.synthesizers import PersistentGeneratorSynthesizer

__all__ = ["DAFLSynthesizer"]


class DAFLSynthesizer(PersistentGeneratorSynthesizer):
    """DAFL: a persistent generator trained ``g_steps`` times per call on
    ``oh CE(t, argmax t) + act (-|f|) + ie (-H(mean p)) (+ bn) + STARS``; the last batch
    goes to the bank, labelled with the teacher's argmax."""

    def _labels(self) -> Tensor:
        # The class term uses the teacher's own argmax (TermWeights.pseudo_labels): these
        # labels only keep the objective's signature.
        return torch.zeros(self.ctx.batch_size, dtype=torch.long, device=self.ctx.device)
