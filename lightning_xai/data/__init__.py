"""Data modules: scikit-learn digits (offline default), the full MNIST from its raw files, census names, a synthetic
set, and torchvision image sets for users with a network."""

from lightning_xai.data.digits import DigitsDataModule, EpochSeededSampler
from lightning_xai.data.mnist import MNISTDataModule
from lightning_xai.data.names import NamesDataModule
from lightning_xai.data.synthetic import SyntheticMultiDataModule
from lightning_xai.data.vision import VisionDataModule, make_datamodule

__all__ = [
    "NamesDataModule",
    "DigitsDataModule",
    "MNISTDataModule",
    "EpochSeededSampler",
    "VisionDataModule",
    "make_datamodule",
    "SyntheticMultiDataModule",
]
