"""Pixel transforms shared by training and inference: normalisation, per-item crops, test-time views.

Everything works on batches (B, C, H, W) on any device. The crop is the one both the fastai loader
(`loaders.RandomResizedCropBatch`) and the bench's plain loop use, so the two train on the same images.
"""
from __future__ import annotations

import math

import numpy as np


def normalise(x_u8, mean: float, std: float):
    """uint8 pixels (any shape, any device) -> float32 model input: /255, then the training stats.
    The one definition every path uses (training batches, predict, bench, Grad-CAM)."""
    return (x_u8.float().div_(255.0) - mean) / std


def to_model_input(arrays, mean: float, std: float, device="cpu"):
    """A list of (S, S) uint8 arrays -> (B, 1, S, S) normalised float32 tensor on `device`."""
    import torch

    return normalise(torch.from_numpy(np.stack(arrays))[:, None].to(device), mean, std)


def random_resized_crop(x, size: int, min_scale: float, u, ratio=(3 / 4, 4 / 3)):
    """Batched RandomResizedCrop: x (B, C, H, W) float -> (B, C, size, size), one crop per image (area
    fraction in [min_scale, 1], aspect ratio in `ratio`, anywhere inside the image), antialiased.
    The crops come from `u`, (B, 4) uniforms in [0, 1) on x's device."""
    import torch

    area = min_scale + (1 - min_scale) * u[:, 0]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)   # crop width as a fraction of the image width
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (2 * u[:, 2] - 1) * (1 - w)          # centre in [-1, 1] coordinates, crop inside the image
    cy = (2 * u[:, 3] - 1) * (1 - h)
    return crop_resize(x, size, w, h, cx, cy)


def crop_resize(x, size: int, w, h, cx, cy):
    """Cut one crop per image and resize it to size x size: w, h are the crop's width and height as
    fractions of the image's, cx, cy its centre in [-1, 1] coordinates; each a (B,) tensor.

    Antialiased like PIL's resize: a downscale by up to k = ceil(image side / size) is sampled
    bilinearly on a k-times finer grid and box-averaged back (plain `grid_sample` would alias, and the
    model would train on crisper, noisier images than the PIL-resized ones it is judged on)."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    k = max(1, math.ceil(max(x.shape[-2:]) / size))  # from shapes only: no host sync
    theta = torch.zeros((b, 2, 3), device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, [b, x.shape[1], k * size, k * size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(out, k) if k > 1 else out


TTA_SCALE = 0.85  # side of the test-time crops, as a fraction of the image's side (area ~0.72)




def tta_views(x, x_large):
    """Test-time augmentation: the whole image as validation sees it, x (B, C, S, S), plus five fixed
    crops (centre and four corners) of side TTA_SCALE cut from x_large (B, C, L, L), the same images at
    the run's cache side (run.json `cache_side`, where training's crops come from), each resized to
    S x S -- crops like those training shows the model. Returns a list of six (B, C, S, S) tensors."""
    import torch

    b, s, size = x.shape[0], TTA_SCALE, x.shape[-1]
    off = 1 - s
    views = [x]
    for cx, cy in ((0.0, 0.0), (-off, -off), (off, -off), (-off, off), (off, off)):
        side = torch.full((b,), s, device=x_large.device, dtype=x_large.dtype)
        views.append(crop_resize(x_large, size, side, side, torch.full_like(side, cx), torch.full_like(side, cy)))
    return views


def gaussian_blur(x, sigma):
    """x (B, C, H, W) float, blurred with a Gaussian of its own sigma per image (sigma (B,), in pixels, 0 =
    unchanged, at most about 1.5: the kernel is 5 taps wide); separable, reflect-padded, one grouped
    convolution per direction for the whole batch."""
    import torch
    import torch.nn.functional as F

    b, c, h, w = x.shape
    r = 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None] / s) ** 2)       # sigma 1e-3: exactly the identity kernel
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def texture_jitter(x, u, z, max_gamma: float = 1.5, max_sigma: float = 1.0, max_noise: float = 0.04,
                   p: float = 0.5):
    """Per-image gamma, blur and Gaussian noise on x (B, C, H, W) in [0, 1]: what differs between hospitals'
    processing pipelines (tone curve, sharpness, noise) rather than between diseases. `u` (B, 6) uniforms
    decide, each with probability p, a gamma in [1/max_gamma, max_gamma] (log-uniform), a blur sigma in
    [0, max_sigma] and a noise std in [0, max_noise]; `z` is standard normal noise of x's shape."""
    import torch

    on = u[:, :3] < p
    one, zero = torch.ones_like(u[:, 0]), torch.zeros_like(u[:, 0])
    gamma = torch.where(on[:, 0], torch.exp((2 * u[:, 3] - 1) * math.log(max_gamma)), one)
    sigma = torch.where(on[:, 1], u[:, 4] * max_sigma, zero)
    std = torch.where(on[:, 2], u[:, 5] * max_noise, zero)
    x = gaussian_blur(x.clamp(0, 1) ** gamma.view(-1, 1, 1, 1).to(x.dtype), sigma)
    return (x + std.view(-1, 1, 1, 1).to(x.dtype) * z).clamp(0, 1)
