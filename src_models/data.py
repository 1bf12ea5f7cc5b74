"""Annotated image folders and their train / validation split.

A dataset is a folder with `images/<stem>.<ext>` and `masks/<stem>.<ext>` (0 = background, 1..N =
one object each, or class ids for semantic masks), as in ../shared/data/GlaS/train and
MoNuSeg/train; CVC-ClinicDB, Kvasir-SEG or a lab's own data load the same way.

The validation split is ours (the official test sets are kept apart): a fixed, seeded choice of
about 20% of the images, grouped by patient where the dataset says who the patient is (GlaS), so
no patient is on both sides. It never changes between runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
VAL_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass
class Sample:
    name: str
    image: np.ndarray   # (H, W, 3) uint8
    mask: np.ndarray    # (H, W) integer labels


def read_image(path: str | Path) -> np.ndarray:
    """The whole image (image_io.read_image: empty/truncated files named, planar RGB as RGB)."""
    from .image_io import read_image as read_any
    return np.asarray(read_any(path, lazy=False))


def list_pairs(root: str | Path) -> dict[str, tuple[Path, Path]]:
    """stem -> (image path, mask path) for every image that has a mask of the same stem."""
    root = Path(root)
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise FileNotFoundError(f"{root} must contain images/ and masks/ folders")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS}
    pairs = {p.stem: (p, masks[p.stem]) for p in sorted(img_dir.iterdir())
             if p.suffix.lower() in IMAGE_EXTS and p.stem in masks}
    if not pairs:
        raise FileNotFoundError(f"no image/mask pairs with matching names under {root}")
    return pairs


def _patient_groups(root: Path, names: list[str]) -> dict[str, list[str]]:
    """GlaS: group image names by patient (Grade.csv beside train/); otherwise one group per image."""
    grade = root.parent / "Grade.csv"
    patient = {}
    if grade.exists():
        for line in grade.read_text().replace("\r", "\n").split("\n")[1:]:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2 and parts[0]:
                patient[parts[0]] = parts[1]
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(patient.get(n, n), []).append(n)
    return groups


def split_names(root: str | Path, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED
                ) -> tuple[list[str], list[str]]:
    """(train names, validation names): seeded, patient-grouped where patients are known."""
    root = Path(root)
    names = sorted(list_pairs(root))
    groups = _patient_groups(root, names)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    target = max(1, round(val_fraction * len(names)))
    val: list[str] = []
    for i in order:  # take whole groups; skip one that would overshoot the target by far
        group = groups[keys[i]]
        if len(val) + len(group) <= max(target * 1.25, 1):
            val.extend(group)
        if len(val) >= target:
            break
    val_set = set(val)
    return [n for n in names if n not in val_set], sorted(val_set)


def load_samples(root: str | Path, names: list[str] | None = None) -> list[Sample]:
    pairs = list_pairs(root)
    out = []
    for name in (names if names is not None else sorted(pairs)):
        img_path, mask_path = pairs[name]
        image = read_image(img_path)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        image = image[..., :3]
        if image.dtype != np.uint8:
            from .preprocess import as_float01
            image = (as_float01(image) * 255).round().astype(np.uint8)
        mask = read_image(mask_path)
        if mask.ndim == 3:  # RGB masks of binary data sets: any non-zero is foreground
            mask = (mask.max(axis=-1) > 0).astype(np.uint8)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{name}: mask shape {mask.shape} differs from image shape {image.shape[:2]}")
        out.append(Sample(name, np.ascontiguousarray(image), mask))
    return out
