"""fastap: listwise Average-Precision losses and exact retrieval evaluation for PyTorch."""

from . import functional, reference
from ._extension import WITH_CUDA
from .losses import APLoss, CrossBatchMemory, FastAPLoss
from .search import PreparedDatabase, topk_similarity

__version__ = "0.1.0"
__all__ = ["APLoss", "CrossBatchMemory", "FastAPLoss", "PreparedDatabase", "functional",
           "reference", "topk_similarity", "WITH_CUDA", "__version__"]
