"""Augmentation for H&E tiles: geometry applied to image and mask alike, colour to the image only.

Geometry: flips and 90-degree rotations (exact), small scale/rotation (bilinear image, nearest
mask). Colour: brightness/contrast and stain jitter in HED (haematoxylin-eosin-DAB) space, which
mimics the variation between labs and scanners better than RGB jitter.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AugmentConfig:
    flips: bool = True
    rot90: bool = True
    affine_p: float = 0.3          # probability of a small scale/rotation
    max_rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.1        # additive, in [0, 1] units
    contrast: float = 0.15         # multiplicative around the mean
    hed_sigma: float = 0.03        # stain jitter: per-channel scale and shift in HED space
    hed_p: float = 0.5


def random_crop(image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator,
                scale: float = 1.0, centre: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A random `size`-sided window (of size*scale source pixels, resized back to `size` when
    scale != 1); images smaller than the window are reflect-padded first. With `centre` (row, col
    of a source pixel) the window is centred there, moved by up to a quarter window at random in
    each direction and kept inside the image, so it always holds that pixel."""
    src = max(1, int(round(size * scale)))
    h, w = mask.shape
    if h < src or w < src:
        ph, pw = max(0, src - h), max(0, src - w)
        mode = "reflect" if ph < h and pw < w else "edge"
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode)
        mask = np.pad(mask, ((0, ph), (0, pw)), mode=mode)
        h, w = mask.shape
    if centre is None:
        y = rng.integers(0, h - src + 1)
        x = rng.integers(0, w - src + 1)
    else:
        j = src // 4
        y = int(np.clip(int(centre[0]) - src // 2 + rng.integers(-j, j + 1), 0, h - src))
        x = int(np.clip(int(centre[1]) - src // 2 + rng.integers(-j, j + 1), 0, w - src))
    img, msk = image[y:y + src, x:x + src], mask[y:y + src, x:x + src]
    if src != size:
        from skimage.transform import resize
        img = resize(img, (size, size, img.shape[2]), order=1, preserve_range=True,
                     anti_aliasing=src > size).astype(image.dtype)
        msk = resize(msk, (size, size), order=0, preserve_range=True, anti_aliasing=False).astype(mask.dtype)
    return img, msk


def flip_rot90(rng: np.random.Generator, arrays, axes, flips: bool = True, rot90: bool = True) -> list:
    """The same random left-right / up-down flips and 90-degree rotation for several arrays (an
    image and its masks), exact; axes[i] = (row axis, column axis) of arrays[i]. Returns views."""
    out = list(arrays)
    if flips and rng.random() < 0.5:
        out = [np.flip(a, ax[1]) for a, ax in zip(out, axes)]
    if flips and rng.random() < 0.5:
        out = [np.flip(a, ax[0]) for a, ax in zip(out, axes)]
    if rot90:
        k = int(rng.integers(0, 4))
        out = [np.rot90(a, k, axes=ax) for a, ax in zip(out, axes)]
    return out


def geometric(image: np.ndarray, mask: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator):
    """image (H, W, C), mask (H, W): exact flips / rotations, then sometimes a small rotation."""
    image, mask = flip_rot90(rng, (image, mask), ((0, 1), (0, 1)), cfg.flips, cfg.rot90)
    if cfg.affine_p and rng.random() < cfg.affine_p:
        from scipy import ndimage
        angle = rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)
        image = ndimage.rotate(image, angle, axes=(0, 1), reshape=False, order=1, mode="reflect")
        mask = ndimage.rotate(mask, angle, axes=(0, 1), reshape=False, order=0, mode="reflect")
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def hed_jitter(image01: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Scale and shift each stain's optical density by N(1, sigma) / N(0, sigma).

    Done in optical-density space with skimage's H&E-DAB matrix, without clipping the stain
    concentrations (skimage's rgb2hed clips negatives, so its round trip is not the identity)."""
    from skimage.color import hed_from_rgb, rgb_from_hed
    od = -np.log(np.clip(image01, 1e-6, 1.0))
    stains = od @ hed_from_rgb
    stains = stains * rng.normal(1.0, sigma, 3) + rng.normal(0.0, sigma, 3)
    return np.clip(np.exp(-(stains @ rgb_from_hed)), 0.0, 1.0).astype(np.float32)


def colour(image01: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """image01: (H, W, 3) float in [0, 1]."""
    if cfg.hed_sigma and image01.shape[-1] == 3 and rng.random() < cfg.hed_p:
        image01 = hed_jitter(image01, cfg.hed_sigma, rng)
    if cfg.contrast:
        c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        m = image01.mean()
        image01 = (image01 - m) * c + m
    if cfg.brightness:
        image01 = image01 + rng.uniform(-cfg.brightness, cfg.brightness)
    return np.clip(image01, 0.0, 1.0).astype(np.float32)
