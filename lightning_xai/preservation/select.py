"""Build a class-balanced preservation set from the *training* data: saliency + uncertainty + k-means diversity."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import Tensor, nn

from lightning_xai._validation import validate_number
from lightning_xai.preservation.scores import (
    gradcam_scores,
    gradient_embedding_scores,
    gradient_input_scores,
    penultimate_embeddings,
    uncertainty_scores,
)

__all__ = ["kmeans_representatives", "build_preservation_set", "PreservationSet"]


def kmeans_representatives(embeddings: Tensor | np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Indices of the samples nearest to each of ``k`` k-means centroids (scikit-learn), one per cluster, distinct.

    Example:
        >>> pts = np.array([[0.0, 0], [0.1, 0], [5, 5], [5.1, 5], [9, 0]])
        >>> sorted(kmeans_representatives(pts, 3).tolist())  # one sample of each blob
        [0, 2, 4]
    """
    x = np.asarray(embeddings, dtype=np.float64)
    k = int(min(k, x.shape[0]))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    km = KMeans(n_clusters=k, random_state=seed, n_init=4).fit(x)
    d = km.transform(x)  # (N, k) distances to the centroids, without an N×k×D temporary
    chosen: list[int] = []
    taken: set[int] = set()
    for c in np.argsort(d.min(axis=0)):  # tightest clusters first, so ties resolve deterministically
        for i in np.argsort(d[:, c], kind="stable"):
            if int(i) not in taken:
                chosen.append(int(i))
                taken.add(int(i))
                break
    return np.array(chosen, dtype=np.int64)


@dataclass
class PreservationSet:
    """Indices into the training dataset, with how each was picked."""

    indices: np.ndarray
    reasons: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def build_preservation_set(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    fraction: float = 0.1,
    seed: int = 0,
    uncertainty: str = "entropy",
    target_layer: nn.Module | None = None,
) -> PreservationSet:
    """Pick ``fraction`` of the (training) samples, class-balanced: per class one third each by Grad-CAM evidence
    (gradient × embedding for token inputs, gradient × input for models without a Conv2d), by uncertainty, and by
    k-means diversity on penultimate embeddings;
    duplicates are replaced by the next candidates so the set has the requested size.

    ``inputs``/``labels`` must be training data only; the returned indices index them.
    """
    validate_number("fraction", fraction, low=0.0, low_open=True, high=1.0)
    n = int(labels.shape[0])
    if inputs.shape[0] != n:
        raise ValueError(f"`inputs` and `labels` disagree on the sample count: {inputs.shape[0]} vs {n}")
    classes = sorted(set(labels.tolist()))
    total = max(len(classes), int(round(fraction * n)))
    feats, logits = penultimate_embeddings(model, inputs)
    unc = uncertainty_scores(logits, uncertainty).numpy()
    if inputs.dtype in (torch.int64, torch.int32) and any(isinstance(m, nn.Embedding) for m in model.modules()):
        sal = gradient_embedding_scores(model, inputs, labels).numpy()
    elif target_layer is not None or any(isinstance(m, nn.Conv2d) for m in model.modules()):
        sal = gradcam_scores(model, inputs, labels, target_layer).numpy()
    else:  # no spatial map to look at: gradient × input
        sal = gradient_input_scores(model, inputs, labels).numpy()
    y = labels.numpy()
    chosen: list[int] = []
    reasons: dict[int, str] = {}
    for ci, c in enumerate(classes):
        members = np.nonzero(y == c)[0]
        quota = total // len(classes) + (1 if ci < total % len(classes) else 0)
        quota = min(quota, members.shape[0])
        parts = [quota // 3 + (1 if r < quota % 3 else 0) for r in range(3)]
        by_sal = members[np.argsort(-sal[members], kind="stable")]
        by_unc = members[np.argsort(-unc[members], kind="stable")]
        div = members[kmeans_representatives(feats[members].numpy(), max(parts[2], 1), seed)] if parts[2] else []
        picked: list[int] = []
        for name, ranked, want in (("gradcam", by_sal, parts[0]), ("uncertainty", by_unc, parts[1])):
            got = 0
            for i in ranked:
                if got == want:
                    break
                if int(i) not in reasons:
                    picked.append(int(i))
                    reasons[int(i)] = name
                    got += 1
        for i in div:
            if len(picked) < quota and int(i) not in reasons:
                picked.append(int(i))
                reasons[int(i)] = "diversity"
        # fill (duplicates between criteria) by alternating saliency and uncertainty order
        for i in (j for pair in zip(by_sal, by_unc) for j in pair):
            if len(picked) >= quota:
                break
            if int(i) not in reasons:
                picked.append(int(i))
                reasons[int(i)] = "fill"
        chosen += picked
    return PreservationSet(np.array(sorted(chosen), dtype=np.int64), reasons)
