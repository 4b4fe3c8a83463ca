"""stars.models: ANN teachers, spiking students, their factories and safe weight files."""

from stars.models.factory import build_teacher, bundled_teacher_path, freeze
from stars.models.io import CheckpointError, load_model_weights, read_metadata, save_model
from stars.models.protocols import SpikingStudent, Teacher
from stars.models.students import STUDENT_PRESETS, build_student
from stars.models.teachers import TEACHER_PRESETS, build_teacher_arch

__all__ = [
    "STUDENT_PRESETS",
    "TEACHER_PRESETS",
    "CheckpointError",
    "SpikingStudent",
    "Teacher",
    "build_student",
    "build_teacher",
    "build_teacher_arch",
    "bundled_teacher_path",
    "freeze",
    "load_model_weights",
    "read_metadata",
    "save_model",
]
