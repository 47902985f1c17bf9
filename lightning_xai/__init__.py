"""lightning_xai: explainability-guided compression of neural networks as PyTorch Lightning callbacks."""

__version__ = "0.1.0"

__all__ = ["__version__"]
