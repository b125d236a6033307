"""EfficientNet models built by compound scaling, and their weights."""

from finetune.models.efficientnet import EfficientNet, EfficientNetConfig, StageSpec
from finetune.models.factory import MODEL_NAMES, create_model
from finetune.models.scaling import VARIANTS, Scaling, compound
from finetune.models.weights import WeightsError

__all__ = ["EfficientNet", "EfficientNetConfig", "MODEL_NAMES", "Scaling", "StageSpec", "VARIANTS",
           "WeightsError", "compound", "create_model"]
