"""The classifier's own evidence: Grad-CAM maps of one convolution stage, upsampled to the image.

A few lines of hooks instead of the ``grad-cam`` package: that package pulls OpenCV and imports
matplotlib, and inference code stays free of both. Grad-CAM (Selvaraju et al., 2017) weights each
channel of a stage's activations by the mean gradient of the class score over the map, sums the
channels and keeps the positive part. ``layer`` CAM (Jiang et al., 2021) weights every position
by its own positive gradient instead, which keeps the finer detail of early stages.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from neu_model.model.layers import ResidualBlock

CAM_KINDS = ("gradcam", "layercam")


def cam_layers(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the model's convolution stages, input side first.

    DefectNet's conv-BN-ReLU blocks (100, 50, 25, 12, 6 and 3 pixels square for a 200x200 input),
    the residual net's blocks, or the seed CNN's ReLUs.
    """
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise TypeError(f"{type(model).__name__} has no `features` Sequential to take Grad-CAM maps from")
    blocks = [m for m in features if isinstance(m, (nn.Sequential, ResidualBlock))]
    return blocks or [m for m in features if isinstance(m, nn.ReLU)]


def _weighted_sum(activation: torch.Tensor, gradient: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gradcam":
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        return functional.relu((weights * activation).sum(1))
    return functional.relu((functional.relu(gradient) * activation).sum(1))


def class_maps(model: nn.Module, images: torch.Tensor, stage: int = 2, targets: torch.Tensor | None = None,
               kind: str = "gradcam", batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps of ``images`` for their predicted (or given) classes.

    Args:
        model: a classifier taking float (N, 1, H, W) pixels in [0, 1]; put in eval mode for the call.
        images: uint8 (N, 1, H, W).
        stage: index into ``cam_layers(model)``.
        targets: class indices to explain; None explains each image's predicted class.
        kind: ``gradcam`` or ``layercam``.

    Returns:
        The maps, float32 (N, H, W), each scaled to a maximum of 1 (all zero where the class has no
        positive evidence), and the softmax probabilities (N, classes).
    """
    if kind not in CAM_KINDS:
        raise ValueError(f"CAM kind {kind!r}: choose one of {CAM_KINDS}")
    layers = cam_layers(model)
    if not -len(layers) <= stage < len(layers):
        raise ValueError(f"cam stage {stage}: {type(model).__name__} has stages 0..{len(layers) - 1}")
    captured: list[torch.Tensor] = []
    handle = layers[stage].register_forward_hook(lambda module, inputs, output: captured.append(output))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    maps, probs = [], []
    try:
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device).float().div(255.0).requires_grad_(True)
            with torch.enable_grad():
                logits = model(x)
                chosen = logits.argmax(1) if targets is None else targets[start:start + batch_size].to(device)
                activation = captured.pop()
                # Images of a batch are independent in eval mode, so one backward pass serves all.
                (gradient,) = torch.autograd.grad(logits.gather(1, chosen[:, None]).sum(), activation)
            cam = _weighted_sum(activation.detach(), gradient, kind)[:, None]
            cam = functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
            maps.append((cam / peak).cpu())
            probs.append(logits.detach().softmax(1).cpu())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(maps), torch.cat(probs)
