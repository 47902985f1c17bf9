"""Data modules: scikit-learn digits (offline default) and torchvision image sets for users with a network."""

from lightning_xai.data.digits import DigitsDataModule, EpochSeededSampler
from lightning_xai.data.names import NamesDataModule
from lightning_xai.data.synthetic import SyntheticMultiDataModule
from lightning_xai.data.vision import VisionDataModule, make_datamodule

__all__ = [
    "NamesDataModule",
    "DigitsDataModule",
    "EpochSeededSampler",
    "VisionDataModule",
    "make_datamodule",
    "SyntheticMultiDataModule",
]
