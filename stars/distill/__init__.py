"""stars.distill: the student's losses, the KD distiller, spike statistics, checkpoints."""

from stars.distill.checkpoint import load_state, save_state
from stars.distill.distiller import KDDistiller
from stars.distill.losses import kd_loss, student_rca, tet_kd_loss
from stars.distill.protocols import Distiller, StepOutput
from stars.distill.spikes import ANNCost, SpikeStats, measure_ann, measure_spikes

__all__ = [
    "ANNCost",
    "Distiller",
    "KDDistiller",
    "SpikeStats",
    "StepOutput",
    "kd_loss",
    "load_state",
    "measure_ann",
    "measure_spikes",
    "save_state",
    "student_rca",
    "tet_kd_loss",
]
