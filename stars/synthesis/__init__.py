"""stars.synthesis: teacher priors, synthesis losses (with STARS' RCA and TAR), generators,
the synthesis methods (:mod:`stars.synthesis.methods`), the memory bank and the quality
report of a synthetic set.

The names below load on first use: the run configuration imports the torch-free method
registry from this package, and must not pull torch in with it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stars.synthesis.factory import build_synthesizer
    from stars.synthesis.generators import ConvGenerator, PixelGenerator
    from stars.synthesis.memory import MemoryBank
    from stars.synthesis.methods.dafl import DAFLSynthesizer
    from stars.synthesis.methods.deepinversion import DeepInversionSynthesizer
    from stars.synthesis.methods.dfad import DFADSynthesizer
    from stars.synthesis.methods.fast import FastSynthesizer
    from stars.synthesis.objective import SynthesisObjective
    from stars.synthesis.priors import (
        BNPrior,
        FeatureTap,
        TailPrior,
        extract_bn_prior,
        extract_tail_prior,
    )
    from stars.synthesis.protocols import Generator, SynthesisStep, Synthesizer
    from stars.synthesis.quality import QualityReport, quality_report
    from stars.synthesis.weights import TermWeights

_LAZY = {
    "BNPrior": "stars.synthesis.priors",
    "ConvGenerator": "stars.synthesis.generators",
    "DAFLSynthesizer": "stars.synthesis.methods.dafl",
    "DFADSynthesizer": "stars.synthesis.methods.dfad",
    "DeepInversionSynthesizer": "stars.synthesis.methods.deepinversion",
    "FastSynthesizer": "stars.synthesis.methods.fast",
    "FeatureTap": "stars.synthesis.priors",
    "Generator": "stars.synthesis.protocols",
    "MemoryBank": "stars.synthesis.memory",
    "PixelGenerator": "stars.synthesis.generators",
    "QualityReport": "stars.synthesis.quality",
    "SynthesisObjective": "stars.synthesis.objective",
    "SynthesisStep": "stars.synthesis.protocols",
    "Synthesizer": "stars.synthesis.protocols",
    "TailPrior": "stars.synthesis.priors",
    "TermWeights": "stars.synthesis.weights",
    "build_synthesizer": "stars.synthesis.factory",
    "extract_bn_prior": "stars.synthesis.priors",
    "extract_tail_prior": "stars.synthesis.priors",
    "quality_report": "stars.synthesis.quality",
}

__all__ = [
    "BNPrior",
    "ConvGenerator",
    "DAFLSynthesizer",
    "DFADSynthesizer",
    "DeepInversionSynthesizer",
    "FastSynthesizer",
    "FeatureTap",
    "Generator",
    "MemoryBank",
    "PixelGenerator",
    "QualityReport",
    "SynthesisObjective",
    "SynthesisStep",
    "Synthesizer",
    "TailPrior",
    "TermWeights",
    "build_synthesizer",
    "extract_bn_prior",
    "extract_tail_prior",
    "quality_report",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stars.synthesis' has no attribute {name!r}")
