"""Small reference models and a plain LightningModule used by recipes, benchmarks and tests."""

from lightning_xai.models.classifier import ImageClassifier
from lightning_xai.models.nets import MLP, LeNet, SmallResNet, build_model

__all__ = ["ImageClassifier", "LeNet", "MLP", "SmallResNet", "build_model"]
