"""Per-sample scores used to pick a preservation set. None of them changes the model.

* :func:`gradcam_scores` — Grad-CAM (the ``grad-cam`` package) with one target per sample: the mean of the
  *unnormalised* ReLU'd class-activation map at the target layer, i.e. how strongly the spatial evidence supports the
  sample's label.
* :func:`gradient_embedding_scores` — the fallback for token inputs (no spatial map): ``Σ |∂logit_y/∂E · E|`` over the
  embedded tokens (gradient × embedding).
* :func:`uncertainty_scores` — least confidence ``1 − max p``, margin ``p(1) − p(2)`` (small = uncertain, so the
  score is ``1 − margin``), entropy ``−Σ p log p``.
* :func:`penultimate_embeddings` — the input of the last Linear layer, for k-means diversity.

All functions run with gradients enabled locally (they work inside Lightning's no-grad hooks), restore every
module's train/eval mode and the parameters' ``.grad``, and remove their hooks even when an exception is raised.
Inputs may live on the CPU: each batch is moved to the model's device, and the scores come back to the CPU once per
batch (they feed scikit-learn and numpy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from lightning_xai.evaluation import class_scores, model_device

__all__ = [
    "gradcam_scores",
    "gradcam_maps",
    "gradient_embedding_scores",
    "gradient_input_scores",
    "uncertainty_scores",
    "penultimate_embeddings",
    "model_state_guard",
    "last_conv",
    "UNCERTAINTY_KINDS",
]

UNCERTAINTY_KINDS = ("least_confidence", "margin", "entropy")


@contextlib.contextmanager
def model_state_guard(model: nn.Module, buffers: bool = False) -> Iterator[None]:
    """Restore train/eval modes and parameter gradients on exit, even after errors (grad-cam calls ``eval()`` and
    ``zero_grad()``); with ``buffers``, also every buffer (batch-norm statistics a train-mode forward updates)."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    saved = {k: v.detach().clone() for k, v in model.named_buffers()} if buffers else {}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for p, g in grads.items():
            p.grad = g
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in saved and v.shape == saved[k].shape:
                    v.copy_(saved[k])


def last_conv(model: nn.Module) -> nn.Module:
    """The last Conv2d of ``model`` (the usual Grad-CAM target layer)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(
            "Grad-CAM needs a Conv2d target layer and `model` has none; name one with `target_layer` "
            "(PreservationGuard(target_layer=...)), or leave it unset for the gradient × input fallback"
        )
    return convs[-1]


class _Scores(nn.Module):
    """``model`` returning only its class scores (pytorch-grad-cam indexes the output as a ``(batch, classes)``
    tensor); the target layer is hooked on ``model``'s own module, so nothing is renamed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return class_scores(self.model(x))


class _RawGradCAM(GradCAM):
    """Grad-CAM that also keeps the unnormalised maps (the package rescales each map to [0, 1])."""

    raw: list[np.ndarray]

    def get_cam_image(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        cam = super().get_cam_image(*args, **kwargs)
        self.raw.append(np.maximum(cam, 0))
        return cam


def gradcam_scores(
    model: nn.Module, inputs: Tensor, labels: Tensor, target_layer: nn.Module | None = None, batch_size: int = 256
) -> Tensor:
    """Grad-CAM evidence for each sample's label: mean of the ReLU'd, unnormalised CAM at ``target_layer``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3))
        >>> gradcam_scores(net, torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])).shape
        torch.Size([5])
    """
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"`inputs` and `labels` disagree on the sample count: {inputs.shape[0]} vs {labels.shape[0]}")
    layer = last_conv(model) if target_layer is None else target_layer
    out: list[Tensor] = []
    with model_state_guard(model), torch.enable_grad():
        # not `with GradCAM(...)`: its __exit__ swallows exceptions; release the hooks ourselves instead
        cam = _RawGradCAM(model=_Scores(model), target_layers=[layer])
        try:
            device = model_device(model)
            for start in range(0, inputs.shape[0], batch_size):
                cam.raw = []
                x = inputs[start : start + batch_size].to(device)
                y = labels[start : start + batch_size].tolist()
                cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in y])
                raw = cam.raw[0].reshape(x.shape[0], -1)
                out.append(torch.from_numpy(raw.mean(axis=1)).float())
        finally:
            cam.activations_and_grads.release()
    return torch.cat(out)


def gradcam_maps(model: nn.Module, inputs: Tensor, labels: Tensor, target_layer: nn.Module | None = None) -> Tensor:
    """Grad-CAM maps for each sample's label, as the package returns them: ``(N, H, W)`` in [0, 1], input size."""
    layer = last_conv(model) if target_layer is None else target_layer
    with model_state_guard(model), torch.enable_grad():
        cam = GradCAM(model=_Scores(model), target_layers=[layer])
        try:
            maps = cam(
                input_tensor=inputs.to(model_device(model)),
                targets=[ClassifierOutputTarget(int(c)) for c in labels.tolist()],
            )
        finally:
            cam.activations_and_grads.release()
    return torch.from_numpy(np.asarray(maps)).float()


def gradient_embedding_scores(
    model: nn.Module, tokens: Tensor, labels: Tensor, embedding: nn.Embedding | None = None, batch_size: int = 256
) -> Tensor:
    """Gradient × embedding saliency for token inputs: ``Σ_t Σ_d |∂z_y/∂E_td · E_td|`` per sample."""
    emb = embedding or next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise ValueError("gradient × embedding saliency needs an nn.Embedding in `model`; pass `embedding`")
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        output.retain_grad()
        captured.append(output)
        return output

    scores: list[Tensor] = []
    with model_state_guard(model), torch.enable_grad():
        model.eval()
        handle = emb.register_forward_hook(hook)
        try:
            device = model_device(model)
            for start in range(0, tokens.shape[0], batch_size):
                captured.clear()
                x = tokens[start : start + batch_size].to(device)
                y = labels[start : start + batch_size].to(device)
                logits = class_scores(model(x))
                logits.gather(1, y[:, None]).sum().backward()
                e = captured[0]
                scores.append((e.grad * e).abs().flatten(1).sum(1).detach().float().cpu())
                model.zero_grad(set_to_none=True)
        finally:
            handle.remove()
    return torch.cat(scores)


def gradient_input_scores(model: nn.Module, inputs: Tensor, labels: Tensor, batch_size: int = 256) -> Tensor:
    """Gradient × input saliency, the fallback for models without a convolution or an embedding (MLPs, tabular
    models): ``Σ_i |∂z_y/∂x_i · x_i|`` per sample, the evidence the input gives for the sample's label (Shrikumar et al.
    2016; it equals LRP-0 for ReLU networks without biases)."""
    scores: list[Tensor] = []
    device = model_device(model)
    with model_state_guard(model), torch.enable_grad():
        model.eval()
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start : start + batch_size].to(device).float().requires_grad_(True)
            y = labels[start : start + batch_size].to(device)
            logits = class_scores(model(x))
            (grad,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), x)
            scores.append((grad * x).abs().flatten(1).sum(1).detach().float().cpu())
    return torch.cat(scores)


def uncertainty_scores(logits: Tensor, kind: str = "entropy") -> Tensor:
    """Uncertainty per sample from ``logits`` ``(N, C)``; higher means more uncertain for every ``kind``."""
    if kind not in UNCERTAINTY_KINDS:
        raise ValueError(f"`kind` must be one of {list(UNCERTAINTY_KINDS)}, got {kind!r}")
    p = torch.softmax(logits.double(), dim=1)
    if kind == "least_confidence":
        return (1.0 - p.max(dim=1).values).float()
    if kind == "margin":
        top2 = p.topk(2, dim=1).values
        return (1.0 - (top2[:, 0] - top2[:, 1])).float()
    return (-(p * torch.log(p.clamp_min(1e-300))).sum(dim=1)).float()


def penultimate_embeddings(model: nn.Module, inputs: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """(embeddings, logits): the input of the model's head and the class scores, in eval mode.

    The head is the ``nn.Linear`` called last in the forward among those with as many outputs as there are classes
    (or, if none has, the Linear called last). Not the last one *registered*: a model may register a Linear it does
    not call on this input (an auxiliary head, a layer of another mode) after its head, which left nothing to read.
    A head called several times per sample (per token) gives its last call's input."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("penultimate embeddings need an nn.Linear head in `model`")
    last: dict[int, Tensor] = {}  # output width -> input of the last call of a Linear of that width (this batch)

    def record(module: nn.Linear, args: tuple) -> None:
        last[module.out_features] = last[-1] = args[0].detach()

    handles = [m.register_forward_pre_hook(record) for m in linears]
    feats: list[Tensor] = []
    outs: list[Tensor] = []
    device = model_device(model)
    try:
        with model_state_guard(model), torch.no_grad():
            model.eval()
            for start in range(0, inputs.shape[0], batch_size):
                last.clear()
                logits = class_scores(model(inputs[start : start + batch_size].to(device))).detach()
                head_input = last.get(logits.shape[-1], last.get(-1))
                if head_input is None:
                    raise ValueError(
                        f"penultimate embeddings need an nn.Linear head called in the forward; none of the "
                        f"{len(linears)} Linear layer(s) of {type(model).__name__} was called"
                    )
                feats.append(head_input.flatten(1).float().cpu())
                outs.append(logits.float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(feats), torch.cat(outs)
