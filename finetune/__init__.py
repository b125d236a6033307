"""effnet-finetune: EfficientNet transfer learning from one command."""

from finetune.models import EfficientNet, WeightsError, create_model

__all__ = ["EfficientNet", "WeightsError", "create_model"]
__version__ = "0.1.0"
