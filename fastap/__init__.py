"""fastap: listwise Average-Precision losses and exact retrieval evaluation for PyTorch."""

from . import functional, reference
from ._extension import WITH_CUDA
from .losses import APLoss, FastAPLoss

__version__ = "0.1.0"
__all__ = ["APLoss", "FastAPLoss", "functional", "reference", "WITH_CUDA", "__version__"]
