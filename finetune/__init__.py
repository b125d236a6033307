"""effnet-finetune: EfficientNet transfer learning from one command."""

from finetune import moved
from finetune.models import EfficientNet, WeightsError, create_model

moved.install()  # the module paths of the previous release, with a FutureWarning (finetune/moved.py)

__all__ = ["EfficientNet", "WeightsError", "create_model"]
__version__ = "0.1.0"
