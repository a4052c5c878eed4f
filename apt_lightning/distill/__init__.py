"""Self-distillation: the teacher view on shared weights and the losses."""

from apt_lightning.distill.losses import (
    Distiller,
    HiddenTransform,
    causal_lm_prediction_loss,
    nearest_alive,
    prediction_loss,
    sample_teacher_layers,
)
from apt_lightning.distill.teacher import TeacherView

__all__ = [
    "Distiller",
    "HiddenTransform",
    "TeacherView",
    "causal_lm_prediction_loss",
    "nearest_alive",
    "prediction_loss",
    "sample_teacher_layers",
]
