"""Instance heads: targets from instance labels, their post-processing, cards and training."""
import numpy as np
import pytest
import torch

from src_models.instances import InstanceMaker, marker_watershed, probabilities_to_labels
from src_models.targets import (HEADS, card_target, head_channels, head_of, instance_target,
                                interior_score, normalised_distance)


def touching_pair():
    """Two rectangles sharing an edge (touching glands) and a third 2 px away."""
    labels = np.zeros((30, 40), np.int32)
    labels[4:16, 4:18] = 1
    labels[4:16, 18:32] = 2
    labels[18:27, 6:30] = 3
    return labels


def one_hot(target, k):
    return np.eye(k, dtype=np.float32)[target].transpose(2, 0, 1)


def test_heads_and_channels():
    assert HEADS == ("binary", "three_class", "distance")
    assert [head_channels(h) for h in HEADS] == [1, 3, 5]
    assert head_of(None) == head_of({}) == "binary" and head_of({"head": "distance"}) == "distance"
    with pytest.raises(ValueError, match="unknown head"):
        instance_target(touching_pair(), "hover")


def test_three_class_target_separates_touching_objects():
    labels = touching_pair()
    t = instance_target(labels, "three_class", boundary_width=2)
    assert set(np.unique(t)) == {0, 1, 2}
    assert (t[labels == 0] != 1).all()                       # interior only inside objects
    assert (t[4:16, 16:20] == 2).all()                       # the shared edge is boundary
    assert (t[16:18, 8:16] == 2).all()                       # so is the 2-px gap below
    assert (t[0:2, 30:40] == 0).all()                        # plain background stays background
    from scipy import ndimage as ndi
    assert ndi.label(t == 1)[1] == 3                         # interiors: one piece per object
    assert (instance_target(labels, "binary") == (labels > 0)).all()


def test_distance_target_levels_peak_inside_each_object():
    labels = touching_pair()
    d = normalised_distance(labels)
    for i in (1, 2, 3):
        assert np.isclose(d[labels == i].max(), 1.0)
    assert d[labels == 0].max() == 0 and d[10, 17] < 0.3     # low at the shared edge
    t = instance_target(labels, "distance", levels=4)
    assert set(np.unique(t)) == {0, 1, 2, 3, 4}
    assert (t[labels == 0] == 0).all() and (t[labels > 0] >= 1).all()


@pytest.mark.parametrize("head", ["three_class", "distance"])
def test_perfect_head_output_gives_back_the_objects(head):
    labels = touching_pair()
    prob = one_hot(instance_target(labels, head), head_channels(head))
    card = {"task": "glands", "head": head, "instance_params": {"min_size": 5}}
    out = probabilities_to_labels(prob, card)
    assert out.max() == 3
    for i in (1, 2, 3):  # each object comes back as one label covering (nearly) all of it
        ids, counts = np.unique(out[labels == i], return_counts=True)
        assert counts.max() / counts.sum() > 0.9
    # The same probabilities read as a binary head merge touching objects.
    assert probabilities_to_labels(prob, card | {"head": "binary"}).max() < 3


def test_relabel_without_rerun_and_marker_settings():
    labels = touching_pair()
    prob = one_hot(instance_target(labels, "three_class"), 3)
    maker = InstanceMaker(prob, {"task": "nuclei", "head": "three_class"})
    assert maker.labels().max() == 3
    assert maker.labels(min_size=10_000).max() == 0           # relabelled from the cached output
    assert maker.labels(marker_threshold=1.5).max() == 1      # no markers: one mask component
    assert maker.interior().shape == labels.shape
    stack = InstanceMaker(np.stack([prob, prob]), {"task": "nuclei", "head": "three_class"}, stack=True)
    assert stack.labels().max() == 6


def test_marker_watershed_keeps_unseeded_components():
    mask = np.zeros((10, 20), bool)
    mask[2:8, 2:8] = mask[2:8, 12:18] = True
    score = np.zeros(mask.shape, np.float32)
    score[4:6, 4:6] = 1.0  # only the left square has a marker
    out = marker_watershed(mask, score, 0.5)
    assert out.max() == 2 and (out[mask] > 0).all()
    assert marker_watershed(np.zeros((4, 4), bool), np.zeros((4, 4))).max() == 0


def test_interior_score_of_the_distance_head_is_the_expected_level():
    prob = np.zeros((5, 1, 2), np.float32)
    prob[4, 0, 0] = 1.0          # surely the core
    prob[0, 0, 1], prob[1, 0, 1] = 0.5, 0.5
    s = interior_score(prob, "distance")
    assert np.isclose(s[0, 0], 0.875) and np.isclose(s[0, 1], 0.125)


def test_card_records_head_and_rejects_unknown_heads(tmp_path):
    from src_models import build_model
    from src_models.checkpoints import CheckpointError, ModelCard, card_for, load_checkpoint, save_checkpoint
    model = build_model("unet", width=0.125, num_classes=3)
    path = save_checkpoint(model, tmp_path / "m.safetensors",
                           card_for(model, task="glands", head="three_class",
                                    training={"target": {"boundary_width": 3}}))
    _, card = load_checkpoint(path)
    assert card.head == "three_class"
    assert (card_target(touching_pair(), card) == instance_target(touching_pair(), "three_class",
                                                                  boundary_width=3)).all()
    assert ModelCard.from_dict({"architecture": "unet", "model_kwargs": {}}).head == "binary"
    with pytest.raises(CheckpointError, match="hover"):
        ModelCard.from_dict({"architecture": "unet", "model_kwargs": {}, "head": "hover"})


def test_training_a_three_class_head_from_a_binary_parent(tmp_path):
    """The output convolution is re-initialised for the new channels, everything else is taken
    from the parent; the card records the head, its target settings and what was re-initialised."""
    from test_training import _write_dataset

    from src_models import build_model
    from src_models.checkpoints import card_for, load_checkpoint, save_checkpoint
    from src_models.train import TrainConfig, init_from, train
    root = _write_dataset(tmp_path / "ds")
    torch.manual_seed(0)
    parent = build_model("unet", width=0.125, patch_size=16)
    save_checkpoint(parent, tmp_path / "parent.safetensors", card_for(parent, task="nuclei"))
    cfg = TrainConfig(data=str(root), out=str(tmp_path / "m.safetensors"), task="nuclei",
                      head="three_class", init=str(tmp_path / "parent.safetensors"),
                      model_kwargs={"dca": True, "width": 0.125, "patch_size": 16}, tile_size=64,
                      batch_size=2, steps=2, val_every=2, warmup_steps=1, seed=0)
    train(cfg)
    model, card = load_checkpoint(tmp_path / "m.safetensors")
    assert card.head == "three_class" and card.num_classes == 3 and card.parent == "parent.safetensors"
    assert card.class_names == ["background", "interior", "boundary"]
    assert card.training["target"]["boundary_width"] == 1 and card.training["selected_on"] == "objects"
    assert card.training["init_reinitialised"] and all(k.startswith("head.") for k in card.training["init_reinitialised"])
    assert card.metrics["validation"]["objects_metric"] == "aji"
    assert card.instance_params["marker_threshold"] == 0.5
    fresh = build_model("unet", width=0.125, patch_size=16, num_classes=3)
    assert init_from(fresh, str(tmp_path / "parent.safetensors"), "unet") == ["head.bias", "head.weight"]
    for name, value in parent.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(fresh.state_dict()[name], value)
    # A finer token grid (patch 8, the accurate variants) has the same weights: all of them are taken.
    finer = build_model("unet", width=0.125, patch_size=8)
    assert init_from(finer, str(tmp_path / "parent.safetensors"), "unet") == []
    assert all(torch.equal(finer.state_dict()[k], v) for k, v in parent.state_dict().items())
    # The final-weights mode: every image, no validation, the card says so.
    cfg.validate, cfg.out, cfg.steps = False, str(tmp_path / "all.safetensors"), 1
    train(cfg)
    _, card = load_checkpoint(tmp_path / "all.safetensors")
    assert card.data_split["validation"] == [] and len(card.data_split["train"]) == 6
    assert card.metrics["validation"]["validated"] is False


def test_a_finetune_round_on_a_three_class_model_learns_its_target():
    """Fine-tuning a three-class checkpoint on corrected instance labels trains the three-class
    target (the labels' ids become interior / boundary, not class ids), end to end."""
    from src_models import build_model
    from src_models.checkpoints import card_for
    from src_models.finetune import CorrectionSampler, finetune
    from src_models.inference import predict_full
    torch.manual_seed(0)
    model = build_model("unet", width=0.125, num_classes=3).eval()
    card = card_for(model, task="nuclei", head="three_class", tile_size=32,
                    training={"target": {"boundary_width": 1}})
    labels = np.zeros((48, 48), np.int32)
    labels[8:20, 8:20], labels[8:20, 20:32] = 1, 2        # a stroke split one object in two
    image = np.full((48, 48, 3), 230, np.uint8)
    image[labels > 0] = (90, 40, 130)
    sampler = CorrectionSampler(image, labels, np.ones(labels.shape, bool), 32, 3, 3, card=card)
    assert set(np.unique(sampler.target)) == {0, 1, 2} and (sampler.target[8:20, 19:21] == 2).all()
    result = finetune(model, image, labels, steps=3, card=card, tile_size=32, replay=None)
    assert result.steps_done == 3 and all(np.isfinite(result.loss_history))
    prob = predict_full(result.model, image, card)
    assert prob.shape == (3, 48, 48)
    assert InstanceMaker(prob, card).labels().shape == labels.shape
