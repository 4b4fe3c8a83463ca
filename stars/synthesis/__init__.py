"""stars.synthesis: teacher priors, synthesis losses (with STARS' RCA and TAR), generators,
synthesizers, the memory bank and the quality report of a synthetic set."""

from stars.synthesis.factory import build_synthesizer
from stars.synthesis.generators import ConvGenerator, PixelGenerator
from stars.synthesis.memory import MemoryBank
from stars.synthesis.objective import SynthesisObjective, TermWeights
from stars.synthesis.priors import (
    BNPrior,
    FeatureTap,
    TailPrior,
    extract_bn_prior,
    extract_tail_prior,
)
from stars.synthesis.protocols import Generator, SynthesisStep, Synthesizer
from stars.synthesis.quality import QualityReport, quality_report
from stars.synthesis.synthesizers import (
    DAFLSynthesizer,
    DeepInversionSynthesizer,
    DFADSynthesizer,
    FastSynthesizer,
)

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
