"""Why did a kept fine-tuning round hurt the unseen half (GlaS train_18), and could a keep rule see it?

Same scenario as `bench_finetune.py` (validation images, left half corrected with the ground truth,
right half scored). Two reports, both printed one line per image:

    python benchmarks/diagnose_keep.py rounds glands            # every validation image
    python benchmarks/diagnose_keep.py rounds glands train_18,train_5
    python benchmarks/diagnose_keep.py rounds glands train_18,train_5 '{"replay_per_batch": 2}'
    python benchmarks/diagnose_keep.py settings glands          # old weights only: cheap

`rounds`: the round with the engine's defaults (or the finetune arguments given as JSON), then for the old and the trained weights (the
trained ones with their re-chosen settings) the signals a keep rule could use: the held-back check
(objects, score), the replay crops the round's check uses (which the round also trains on), and
4 crops of the card's tile size from OTHER training images of the card that the round never sees
("held-out training crops", cut here exactly as by the first draft of
`scripts/make_replay_crops.py` in this session: seed 1, images not replayed), next to the change
of the unseen half's score (ground truth the round never sees).

`settings`: what the settings-only fallback (`finetune(settings_alone=True)`) would keep with the
old weights: the settings re-chosen on the trained-on part, their score on the held-back part, and
the unseen half with the card's and with the re-chosen settings. Its check omits the replay crops.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_finetune import DATA, object_score  # noqa: E402
from src_models.checkpoints import load_checkpoint  # noqa: E402
from selected_weights import for_validation  # noqa: E402  (the weights that have not seen val)
from src_models.data import load_samples  # noqa: E402
from src_models.finetune import bundled_replay, finetune, region_mask  # noqa: E402
from src_models.finetune_check import (RegionScore, choose_postprocessing, compare_labels,  # noqa: E402
                                       crop_probabilities, judge_round, labels_in, region_box,
                                       region_probabilities, replay_crops, score_region,
                                       split_check)
from src_models.inference import predict  # noqa: E402
from src_models.instances import InstanceMaker, InstanceParams  # noqa: E402

DATASET = {"glands": "GlaS", "nuclei": "MoNuSeg"}


def held_out_crops(card, root: Path, count: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """One crop of the card's tile size from each of `count` training images that the shipped
    replay crops do not come from."""
    import imageio.v3 as iio
    names = sorted(card.data_split["train"])
    replayed = sorted(np.random.default_rng(0).choice(names, 4, replace=False).tolist())
    rng = np.random.default_rng(1)
    out = []
    for name in sorted(rng.choice([n for n in names if n not in replayed], count, replace=False).tolist()):
        image = iio.imread(root / "images" / f"{name}.png")[..., :3]
        mask = iio.imread(root / "masks" / f"{name}.png").astype(np.int32)
        size = min(int(card.tile_size), *mask.shape)
        y0 = int(rng.integers(0, mask.shape[0] - size + 1))
        x0 = int(rng.integers(0, mask.shape[1] - size + 1))
        out.append((image[y0:y0 + size, x0:x0 + size], mask[y0:y0 + size, x0:x0 + size]))
    return out


def on_crops(model, crops, card, params, min_size, probs=None):
    probs = probs or [predict(model, im, card, device="cpu") for im, _ in crops]
    scores = [compare_labels(m, labels_in(p, card, params), params.mode, min_size)
              for p, (_, m) in zip(probs, crops)]
    return probs, (float(np.mean([s.score for s in scores])), float(np.mean([s.dice for s in scores])),
                   sum(s.matched for s in scores), sum(s.objects for s in scores))


def rounds(task: str, names: list[str], kwargs: dict | None = None) -> None:
    model, card = load_checkpoint(for_validation(task))
    root = DATA / DATASET[task] / "train"
    p0 = InstanceParams.from_card(card)
    mins = max(1, int(p0.min_size))
    held = held_out_crops(card, root)
    replay = replay_crops(bundled_replay(card), min(int(card.tile_size), 224))
    held_p0, h0 = on_crops(model, held, card, p0, mins)
    _, r0 = on_crops(model, replay, card, p0, mins)
    print(f"held-out training crops, old weights: score {h0[0]:.3f} Dice {h0[1]:.3f} matched {h0[2]} of {h0[3]}")
    for s in load_samples(root, names):
        h, w = s.mask.shape
        res = finetune(model, s.image, s.mask, region=(0, h, 0, w // 2), card=card, **(kwargs or {}))
        p1 = replace(p0, **{k: v for k, v in res.corrections["instance_params"].items() if k in asdict(p0)})
        _, h1 = on_crops(res.trained, held, card, p1, mins)
        _, r1 = on_crops(res.trained, replay, card, p1, mins)
        right = (slice(None), slice(w // 2, w))
        before = InstanceMaker(predict(model, s.image, card, device="cpu"), card).labels(**asdict(p0))
        after = InstanceMaker(predict(res.trained, s.image, card, device="cpu"), card).labels(**asdict(p1))
        change = object_score(task, s.mask[right], after[right]) - object_score(task, s.mask[right], before[right])
        c = res.corrections["check"]
        print(f"{s.name:26s} kept={str(res.kept):5s} R(trained) {change:+.3f} | held-out score "
              f"{h0[0]:.3f}->{h1[0]:.3f} ({h1[0] - h0[0]:+.3f}) Dice {h1[1] - h0[1]:+.4f} matched "
              f"{h0[2]}->{h1[2]} | replay(trained-on) Dice {r1[1] - r0[1]:+.4f} score {r1[0] - r0[0]:+.3f} | "
              f"check {c['before']['score']:.3f}->{c['after']['score']:.3f} n={c['before']['objects']}",
              flush=True)


def settings(task: str, names: list[str]) -> None:
    model, card = load_checkpoint(for_validation(task))
    p0 = InstanceParams.from_card(card)
    mins = max(1, int(p0.min_size))
    none = RegionScore(1, 1, 1.0, "dice", 1.0, 1)      # the replay check is left out here
    for s in load_samples(DATA / DATASET[task] / "train", names):
        image, gt = s.image, s.mask
        h, w = gt.shape
        valid = region_mask((0, h, 0, w // 2), gt.shape)
        check = split_check(valid, gt, 0.25)
        prob, box = region_probabilities(model, image, card, valid, "cpu")
        tuned, _ = choose_postprocessing(prob, box, gt, valid & ~check, card, p0, mins)
        part_box = region_box(check)
        part = crop_probabilities(prob, box, part_box)
        b = score_region(part, part_box, gt, check, card, p0, mins)
        a = score_region(part, part_box, gt, check, card, tuned, mins)
        ok, why = judge_round(b, a, none, none, True)
        maker = InstanceMaker(predict(model, image, card, device="cpu"), card)
        right = (slice(None), slice(w // 2, w))
        r0 = object_score(task, gt[right], maker.labels(**asdict(p0))[right])
        r1 = object_score(task, gt[right], maker.labels(**asdict(tuned))[right])
        moved = {k: v for k, v in asdict(tuned).items() if asdict(p0)[k] != v}
        print(f"{s.name:26s} tuned {moved} check {b.score:.3f}->{a.score:.3f} ok={ok} | R {r0:.3f} -> "
              f"{r1:.3f} ({r1 - r0:+.3f}) | {why[:60]}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    what, task = sys.argv[1], sys.argv[2]
    _, card = load_checkpoint(for_validation(task))
    images = sys.argv[3].split(",") if len(sys.argv) > 3 else list(card.data_split["validation"])
    if what == "rounds":
        import json
        rounds(task, images, json.loads(sys.argv[4]) if len(sys.argv) > 4 else None)
    else:
        settings(task, images)
