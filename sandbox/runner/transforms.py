"""The transform steps on the device: batch-wise torch code for a decoded `protocol.Transform`.

Why batch-wise: images stay one uint8 tensor on the model's device (loader.py); each step below works
on a whole NCHW batch at once, so a transform costs a few kernel launches per batch and no per-sample
Python. Random steps (crop offsets, flips) draw from the trial's generator, on the CPU like the
stream's shuffle, so a trial's seed fixes them; evaluation batches use only the deterministic part
(centre crop, no flip).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sandbox.protocol import FIT_PAD, Transform


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator).to(device)


def crop(x: torch.Tensor, side: int, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """A `side` x `side` window per image: at a random place per image in training, centred (rounded as
    torchvision's CenterCrop) in evaluation. Images no larger than `side` are returned whole."""
    n, _, h, w = x.shape
    ch, cw = min(side, h), min(side, w)
    if (ch, cw) == (h, w):
        return x
    if not train:
        top, left = round((h - ch) / 2), round((w - cw) / 2)
        return x[:, :, top : top + ch, left : left + cw]
    top = (_uniform(n, generator, x.device) * (h - ch + 1)).long().clamp_(max=h - ch)
    left = (_uniform(n, generator, x.device) * (w - cw + 1)).long().clamp_(max=w - cw)
    rows = top[:, None] + torch.arange(ch, device=x.device)  # (N, ch)
    cols = left[:, None] + torch.arange(cw, device=x.device)  # (N, cw)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def pad_symmetric(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad `pad` pixels on every side by mirroring the border including the edge pixel (torchvision's
    'symmetric' mode: [a b c] -> [b a | a b c | c b]); `pad` at most the image side."""
    if pad <= 0:
        return x
    x = torch.cat([x[..., :pad].flip(-1), x, x[..., -pad:].flip(-1)], dim=-1)
    return torch.cat([x[..., :pad, :].flip(-2), x, x[..., -pad:, :].flip(-2)], dim=-2)


def resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear resize to `side` x `side`, antialiased when shrinking (as PIL's resize is)."""
    if x.shape[-2:] == (side, side):
        return x
    shrinking = x.shape[-1] > side or x.shape[-2] > side
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=shrinking)


def pad_to(x: torch.Tensor, side: int) -> torch.Tensor:
    """Zero-pad right and bottom to `side` x `side` (LEMUR's soft_pad); a larger image is first resized
    down so every batch has one shape."""
    if x.shape[-1] > side or x.shape[-2] > side:
        x = resize(x, side)
    return F.pad(x, (0, side - x.shape[-1], 0, side - x.shape[-2]))


def random_flip(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image horizontally with probability `p`."""
    flip = _uniform(x.shape[0], generator, x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def apply_transform(
    x: torch.Tensor,
    tf: Transform,
    mean: torch.Tensor,
    std: torch.Tensor,
    train: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 NCHW -> float32 (complex64 for complex kinds) of side `tf.size`, steps in `Transform`'s order;
    random crops and flips only for training batches."""
    out = x.float().div_(255.0)
    if tf.crop is not None:
        out = crop(out, tf.crop, train, generator)
    out = pad_symmetric(out, tf.pad)
    if tf.size is not None:
        out = pad_to(out, tf.size) if tf.fit == FIT_PAD else resize(out, tf.size)
    if train and tf.flip:
        out = random_flip(out, tf.flip_p, generator)
    if tf.normalize:
        out = (out - mean) / std
    if tf.complex:
        out = out.to(torch.complex64)
    return out
