"""src_models.widen and scripts/widen_checkpoint.py: a twice-as-wide U-Net + DCA that computes what
the narrow one computes, so an accurate variant continues from the fast weights."""
from __future__ import annotations

import pytest
import torch

from src_models import build_model
from src_models.checkpoints import card_for, load_checkpoint, save_checkpoint
from src_models.widen import widen_state

from script_module import load_script


def trained_like(width=0.125, num_classes=3, seed=0):
    """A narrow model whose every weight, BatchNorm statistic and affine is non-trivial."""
    torch.manual_seed(seed)
    model = build_model("unet", width=width, num_classes=num_classes, patch_size=16)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def wide_of(narrow):
    config = dict(narrow.config)
    config["width"] *= 2
    return build_model("unet", **config)


def test_widened_model_computes_the_same_logits():
    narrow = trained_like()
    wide = wide_of(narrow)
    wide.load_state_dict(widen_state(narrow, wide))
    wide.eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected, got = narrow(x), wide(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    # and it really is the wider network: about four times the weights
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(p.numel() for p in narrow.parameters())


def test_noise_lets_twins_differ_and_moves_the_function_by_little():
    narrow = trained_like()
    wide = wide_of(narrow)
    wide.load_state_dict(widen_state(narrow, wide, noise=0.02, generator=torch.Generator().manual_seed(1)))
    w = wide.encoder[0].conv[0][0].weight
    assert not torch.equal(w[0::2], w[1::2])
    exact = wide_of(narrow)
    exact.load_state_dict(widen_state(narrow, exact))
    e = exact.encoder[0].conv[0][0].weight
    assert torch.equal(e[0::2], e[1::2])
    # the function moved by little: the noise is a perturbation, not a new network
    x = torch.randn(1, 3, 64, 64)
    wide.eval()
    with torch.no_grad():
        assert (wide(x) - narrow(x)).abs().max() < 0.5 * narrow(x).abs().max()


def test_a_model_that_is_not_twice_as_wide_is_refused():
    narrow = trained_like()
    config = dict(narrow.config)
    config["width"] = 0.375
    with pytest.raises(ValueError, match="cannot widen"):
        widen_state(narrow, build_model("unet", **config))


def test_script_writes_a_wide_checkpoint_whose_card_names_its_parent(tmp_path):
    narrow = trained_like()
    card = card_for(narrow, task="glands", head="three_class", tile_size=64,
                    class_names=["background", "interior", "boundary"],
                    metrics={"validation": {"object_f1": 0.9}})
    parent = save_checkpoint(narrow, tmp_path / "fast.safetensors", card)
    out = tmp_path / "wide.safetensors"
    script = load_script("scripts/widen_checkpoint.py")
    assert script.main([str(parent), str(out), "--noise", "0"]) == 0
    wide, wide_card = load_checkpoint(out)
    assert wide_card.model_kwargs["width"] == 0.25
    assert wide_card.training["widened_from"]["noise"] == 0
    assert wide_card.metrics == {} and wide_card.head == "three_class"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(wide(x), narrow(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception):            # never overwrites
        script.main([str(parent), str(out)])
