"""Preservation set: Grad-CAM saliency, uncertainty and k-means diversity over the training data."""

from lightning_xai.preservation.scores import (
    gradcam_scores,
    gradient_embedding_scores,
    gradient_input_scores,
    penultimate_embeddings,
    uncertainty_scores,
)
from lightning_xai.preservation.select import build_preservation_set, kmeans_representatives

__all__ = [
    "gradcam_scores",
    "gradient_embedding_scores",
    "gradient_input_scores",
    "penultimate_embeddings",
    "uncertainty_scores",
    "kmeans_representatives",
    "build_preservation_set",
]
