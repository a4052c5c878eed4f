"""apt-lightning: APT (Adaptive Pruning and Tuning, Zhao et al., ICML 2024) for PyTorch Lightning."""

from apt_lightning.data.tasks import TaskSpec
from apt_lightning.module import APTModule

__all__ = ["APTModule", "TaskSpec"]
__version__ = "0.1.0"
