"""Training engine on a tiny synthetic dataset: split, augmentation, loss, train + resume."""
import numpy as np
import pytest
import torch

from src_models.augment import AugmentConfig, geometric, hed_jitter, random_crop
from src_models.data import load_samples, split_names
from src_models.losses import dice_ce_loss, touching_gap_weights


def _write_dataset(root, n=6, size=72, seed=0):
    import imageio.v3 as iio
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        img = np.full((size, size, 3), 230, np.uint8)
        for j in range(1, 5):
            cy, cx = rng.integers(10, size - 10, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 36
            mask[disc] = j
            img[disc] = (90, 40, 140)
        iio.imwrite(root / "images" / f"img_{i}.png", img)
        iio.imwrite(root / "masks" / f"img_{i}.png", mask)
    return root


def test_split_is_fixed_disjoint_and_patient_grouped(tmp_path):
    root = _write_dataset(tmp_path / "ds" / "train", n=10)
    (tmp_path / "ds" / "Grade.csv").write_text(
        "name,patient ID,grade\r" + "\r".join(f"img_{i},{i // 2},benign" for i in range(10)))
    train, val = split_names(root)
    assert (train, val) == split_names(root)
    assert not set(train) & set(val) and len(train) + len(val) == 10 and val
    patients = {int(n.split("_")[1]) // 2 for n in val}
    for p in patients:  # whole patients on the validation side
        assert {f"img_{2 * p}", f"img_{2 * p + 1}"} <= set(val)


def test_shared_splits_hold_out_about_a_fifth(shared):
    for ds in ("GlaS", "MoNuSeg"):
        train, val = split_names(shared / "data" / ds / "train")
        assert 0.15 <= len(val) / (len(train) + len(val)) <= 0.25


def test_geometry_moves_image_and_mask_together():
    rng = np.random.default_rng(1)
    mask = np.zeros((40, 40), np.uint8)
    mask[5:12, 20:35] = 1
    image = np.stack([mask * 200] * 3, -1).astype(np.uint8)
    for _ in range(20):
        img, msk = geometric(image, mask, AugmentConfig(affine_p=0.0), rng)
        assert np.array_equal(img[..., 0] > 100, msk > 0)


def test_random_crop_pads_small_images_and_keeps_alignment():
    rng = np.random.default_rng(0)
    mask = (np.arange(30 * 20).reshape(30, 20) % 7 == 0).astype(np.uint8)
    image = np.repeat(mask[..., None] * 255, 3, -1).astype(np.uint8)
    img, msk = random_crop(image, mask, 48, rng)
    assert img.shape == (48, 48, 3) and msk.shape == (48, 48)
    assert np.array_equal(img[..., 0] > 127, msk > 0)


def test_random_crop_around_a_centre_always_holds_that_pixel():
    rng = np.random.default_rng(0)
    ids = np.arange(100 * 120, dtype=np.int32).reshape(100, 120)
    image = np.zeros((100, 120, 3), np.uint8)
    for row, col in [(0, 0), (99, 119), (50, 60), (10, 110)]:
        for _ in range(10):
            _, msk = random_crop(image, ids, 40, rng, centre=(row, col))
            assert msk.shape == (40, 40) and ids[row, col] in msk


def test_focus_crops_draw_their_share_around_the_centres_and_off_changes_nothing(tmp_path):
    import json

    from src_models.data import Sample
    from src_models.train import TileSampler, TrainConfig
    mask = np.zeros((200, 200), np.uint8)
    mask[150:200, 150:200] = 1          # the hard negative's neighbourhood is labelled 1
    image = np.zeros((200, 200, 3), np.uint8)
    samples = [Sample("a", image, mask), Sample("b", image, np.zeros_like(mask))]
    focus = tmp_path / "focus.json"
    focus.write_text(json.dumps({"images": {"a": {"centres": [{"row": 175, "col": 175}]},
                                            "not_trained_on": {"centres": [{"row": 1, "col": 1}]}}}))
    base = dict(data=".", out="x", tile_size=32, batch_size=8, scale_jitter=(1.0, 1.0), head="binary")
    on = TileSampler(samples, TrainConfig(**base, focus_crops=str(focus), focus_fraction=1.0), 3, 1)
    assert on.focus == [(0, 175, 175)]
    _, y, _ = on.batch(np.random.default_rng(0))
    assert all(t.sum() > 0 for t in y)  # every crop holds the centre, so some of the labelled corner
    off = [TileSampler(samples, TrainConfig(**base, **kw), 3, 1).batch(np.random.default_rng(3))
           for kw in ({}, {"focus_crops": str(focus), "focus_fraction": 0.0})]
    assert all(torch.equal(a, b) for a, b in zip(off[0][:2], off[1][:2]))
    focus.write_text(json.dumps({"images": {"elsewhere": {"centres": [{"row": 1, "col": 1}]}}}))
    with pytest.raises(ValueError, match="none of its"):
        TileSampler(samples, TrainConfig(**base, focus_crops=str(focus), focus_fraction=0.5), 3, 1)


def test_stain_jitter_keeps_range_and_changes_colour():
    rng = np.random.default_rng(0)
    img = np.random.default_rng(1).uniform(0.2, 0.9, (16, 16, 3)).astype(np.float32)
    out = hed_jitter(img, 0.05, rng)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out, img)
    assert np.allclose(hed_jitter(img, 0.0, rng), img, atol=1e-3)


def test_loss_ignores_pixels_outside_valid_mask():
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 8, 8, requires_grad=True)
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    valid = torch.zeros(1, 8, 8, dtype=torch.bool)
    valid[:, :4] = True
    other = target.clone()
    other[:, 4:] = 1  # differs only outside the valid region
    a = dice_ce_loss(logits, target, valid)
    b = dice_ce_loss(logits, other, valid)
    assert torch.allclose(a, b)
    a.backward()
    assert logits.grad[..., 4:, :].abs().sum() == 0


def test_gap_weights_mark_only_background_between_two_different_objects():
    labels = np.zeros((20, 40), np.int32)
    labels[5:15, 2:12] = 1      # 1 and 2 are 3 px apart: a gap
    labels[5:15, 15:25] = 2
    labels[5:15, 33:38] = 3     # 3 is 8 px from 2: no gap at radius 3
    w = touching_gap_weights(labels, radius=3, weight=7.0)
    assert set(np.unique(w)) == {1.0, 7.0}
    assert (w[5:15, 12:15] == 7.0).all()               # the gap itself
    assert (w[labels > 0] == 1.0).all()                # never on objects
    assert (w[:, 26:] == 1.0).all()                    # around a lone object: nothing
    assert (touching_gap_weights(np.zeros((8, 8), np.int32)) == 1.0).all()


def test_pixel_weight_scales_cross_entropy_only_where_asked():
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 8, 8)
    target = (torch.rand(1, 8, 8) > 0.5).long()
    ones = torch.ones(1, 8, 8)
    assert torch.allclose(dice_ce_loss(logits, target, pixel_weight=ones), dice_ce_loss(logits, target))
    heavier = ones.clone()
    heavier[0, 0, 0] = 10.0
    ce_only = dict(dice_weight=0.0)
    ce_pixel = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, 0, 0, 0], target[0, 0, 0].float())
    diff = dice_ce_loss(logits, target, pixel_weight=heavier, **ce_only) - dice_ce_loss(logits, target, **ce_only)
    assert torch.allclose(diff, 9.0 * ce_pixel / 64)


def test_multiclass_loss_is_finite_and_lower_for_right_answer():
    target = torch.randint(0, 3, (2, 8, 8))
    good = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 10
    bad = torch.zeros(2, 3, 8, 8)
    assert dice_ce_loss(good, target) < dice_ce_loss(bad, target)


def test_train_writes_best_checkpoint_with_complete_card_and_resumes(tmp_path):
    from src_models.checkpoints import load_checkpoint
    from src_models.train import TrainConfig, train
    root = _write_dataset(tmp_path / "ds")
    cfg = TrainConfig(data=str(root), out=str(tmp_path / "m.safetensors"), task="nuclei",
                      model_kwargs={"dca": True, "width": 0.125, "patch_size": 16}, tile_size=64,
                      batch_size=2, steps=4, val_every=2, warmup_steps=1, seed=3)
    summary = train(cfg)
    assert summary["steps"] == 4 and summary["stopped"] == "steps"
    model, card = load_checkpoint(tmp_path / "m.safetensors")
    assert card.task == "nuclei" and card.tile_size == 64
    assert set(card.data_split["validation"]).isdisjoint(card.data_split["train"])
    assert "dice_native" in card.metrics["validation"] and "dice_paper_protocol" in card.metrics["validation"]
    assert card.training["steps"] == 4 and card.instance_params["mode"] == "nuclei"
    # Resume continues from the saved step instead of starting again.
    cfg.steps, cfg.resume = 6, True
    assert train(cfg)["steps"] == 6
    # Same seed, same run: reproducible losses.
    cfg2 = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "again.safetensors"), "steps": 4, "resume": False})
    assert np.allclose(train(cfg2)["loss_history"], summary["loss_history"])
    # Starting from a checkpoint's weights records it as the parent.
    cfg3 = TrainConfig(**{**cfg2.__dict__, "out": str(tmp_path / "child.safetensors"), "steps": 1,
                          "val_every": 1, "init": str(tmp_path / "m.safetensors")})
    train(cfg3)
    assert load_checkpoint(tmp_path / "child.safetensors")[1].parent == "m.safetensors"
    # Gap weighting (for touching objects) trains too, and is recorded in the card.
    cfg4 = TrainConfig(**{**cfg2.__dict__, "out": str(tmp_path / "gap.safetensors"), "steps": 1,
                          "val_every": 1, "gap_weight": 5.0, "gap_radius": 2})
    train(cfg4)
    assert load_checkpoint(tmp_path / "gap.safetensors")[1].training["gap_weight"] == 5.0
    with pytest.raises(ValueError, match="not the requested"):
        train(TrainConfig(**{**cfg3.__dict__, "model_kwargs": {"dca": False, "width": 0.125}}))


def test_object_validation_uses_the_recipes_post_processing(tmp_path, monkeypatch):
    # A run continuing a tuned model is selected with the settings it ships with, not the defaults.
    import src_models.instances as instances
    from src_models.data import load_samples
    from src_models.registry import build_model
    from src_models.train import TrainConfig, _object_validation
    root = _write_dataset(tmp_path / "ds", n=1)
    seen = []
    real = instances.InstanceMaker

    def spy(prob, card, *a, **k):
        seen.append(dict(card.instance_params))
        return real(prob, card, *a, **k)
    monkeypatch.setattr(instances, "InstanceMaker", spy)
    model = build_model("unet", dca=True, width=0.125, patch_size=16, num_classes=3)
    sample = load_samples(root)[0]
    tuned = {"mode": "nuclei", "threshold": 0.7, "min_size": 5, "marker_threshold": 0.8}
    for given, expected_threshold in ((tuned, 0.7), (None, 0.5)):
        cfg = TrainConfig(data=str(root), out=str(tmp_path / "m.safetensors"), task="nuclei",
                          head="three_class", tile_size=64, instance_params=given)
        _object_validation(model, sample, cfg, torch.device("cpu"))
        assert seen[-1]["threshold"] == expected_threshold
