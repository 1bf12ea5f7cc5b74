"""napari-dca's engine: DCA U-Nets, checkpoints, inference, training. Pure PyTorch + NumPy."""
__version__ = "0.1.0"

from .dca import DCA, DCAAttention, capture_attention
from .registry import build_model, list_models, PAPER_DEFAULTS
from .convert import from_official

__all__ = ["DCA", "DCAAttention", "capture_attention", "build_model", "list_models", "PAPER_DEFAULTS",
           "from_official", "__version__"]
