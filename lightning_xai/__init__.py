"""lightning_xai: explainability-guided compression of neural networks as PyTorch Lightning callbacks.

One face for users (like ``torchmetrics``): the callbacks, the mixin, the loaders of the files they write and the
data modules are importable from the package root.

Example:
    >>> from lightning_xai import SelfCompression, load_compressed
    >>> SelfCompression(gamma=0.05).compressor.gamma
    0.05
"""

__version__ = "0.1.0"

from lightning_xai.callbacks import (  # noqa: E402
    AttributionPruning,
    CSWAPPruning,
    LRPCompression,
    PreservationGuard,
    SelfCompression,
)
from lightning_xai.data import (  # noqa: E402
    DigitsDataModule,
    MNISTDataModule,
    NamesDataModule,
    SyntheticMultiDataModule,
    VisionDataModule,
)
from lightning_xai.mixin import CompressionMixin  # noqa: E402
from lightning_xai.pruning.units import load_pruned  # noqa: E402
from lightning_xai.quantization.export import load_compressed  # noqa: E402
from lightning_xai.quantization.mixed import load_mixed  # noqa: E402

__all__ = [
    "__version__",
    "SelfCompression",
    "PreservationGuard",
    "CSWAPPruning",
    "AttributionPruning",
    "LRPCompression",
    "CompressionMixin",
    "load_compressed",
    "load_pruned",
    "load_mixed",
    "DigitsDataModule",
    "MNISTDataModule",
    "NamesDataModule",
    "SyntheticMultiDataModule",
    "VisionDataModule",
]
