"""Grad-CAM (Selvaraju et al. 2017) on ResNet9's last feature map, for a batch of model inputs, and its
overlay on the radiograph as a PNG.

The project's one Grad-CAM (serve calls it on uploads, `evaluate.report.grad_cams` on the run's images),
on model inputs: the last feature map, the gradient of the chosen class's logit with respect to it,
channel weights = the gradient's spatial mean, ReLU of the weighted sum, bilinear upsampling to the input
side, scaled to [0, 1] per image. In eval mode the images of a batch do not interact, so one backward pass
gives every image's map.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np


def grad_cam_maps(model, x, targets: Sequence[int] | None = None) -> np.ndarray:
    """(B, S, S) float32 maps in [0, 1] for a preprocessed batch x (B, 1, S, S); `targets`: the class of
    each image to explain (default: the model's own prediction)."""
    import torch
    import torch.nn.functional as F

    model = getattr(model, "_orig_mod", model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = x.float()
            feats = model.forward_features(x).detach().requires_grad_(True)   # (B, C, h, w)
            logits = model.head(model.pool(feats))
            idx = logits.argmax(1) if targets is None else torch.as_tensor(list(targets), device=logits.device)
            (g,) = torch.autograd.grad(logits.gather(1, idx.long()[:, None]).sum(), feats)
        w = g.mean((2, 3), keepdim=True)                                          # (B, C, 1, 1)
        cam = F.relu((w * feats.detach()).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
        cam = cam / cam.amax((1, 2), keepdim=True).clamp(min=1e-8)
        return cam.cpu().numpy().astype(np.float32)
    finally:
        model.train(was_training)


def overlay_png(grey: np.ndarray, cam: np.ndarray, alpha: float = 0.35) -> bytes:
    """PNG bytes: the grey image (H, W uint8) with the map (any side, [0, 1]) in matplotlib's jet colours
    over it at `alpha`, as the report's Grad-CAM figures draw it; the image's size."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = grey.shape
    cam8 = np.clip(np.asarray(cam, np.float32) * 255.0, 0, 255).astype(np.uint8)
    up = np.asarray(Image.fromarray(cam8, mode="L").resize((w, h), Image.BILINEAR), np.float32) / 255.0
    colour = colormaps["jet"](up)[..., :3]
    rgb = (1 - alpha) * (grey.astype(np.float32)[..., None] / 255.0) + alpha * colour
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
