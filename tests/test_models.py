"""Every backbone, with and without DCA: shapes at any size, gradients, paper parameter counts,
DCA's token grid, and attention capture. Engine only (no Qt); small widths and sizes."""
from __future__ import annotations

import pytest
import torch

from src_models import build_model, capture_attention, list_models
from src_models.dca import DCA

torch.set_num_threads(1)

NAMES = ["unet", "vnet", "r2unet", "resunetpp", "multiresunet", "doubleunet"]
VARIANTS = [(name, dca) for name in NAMES for dca in (False, True)]
SMALL = 0.125

# Official parameter counts at the paper's configuration (k = 0.5, 3 in, 1 out), without / with DCA.
PAPER_PARAMS = {
    "unet": (8_637_345, 8_747_905),
    "resunetpp": (13_090_980, 13_121_668),
    "multiresunet": (7_244_070, 7_354_630),
    "r2unet": (9_781_729, 9_892_289),
    "vnet": (35_970_106, 36_080_666),
}
# DoubleU-Net: only the paper's rounded figures exist (the reference file does not build); 1 %.
DOUBLEUNET_PAPER = (29.68e6, 30.68e6)

# Parameters that by design receive no gradient: V-Net's first 1x1 shortcut only feeds DCA
# (the reference normalises the stage's convolution output, not the residual sum).
# MultiResUNet with DCA: DCA takes each ResPath's last residual sum, so that path's last BatchNorm
# is unused (as in the reference).
NO_GRAD = {("vnet", False): {"encoder.0.shortcut.weight", "encoder.0.shortcut.bias"},
           ("multiresunet", True): {f"respaths.{i}.norms.{3 - i}.{p}"
                                    for i in range(4) for p in ("weight", "bias")}}


def small_model(name: str, dca: bool, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, dca=dca, width=SMALL, **kw)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_all_six_backbones():
    assert set(NAMES) <= set(list_models())


@pytest.mark.parametrize("name,dca", VARIANTS)
def test_training_forward_shape_and_every_parameter_gets_a_gradient(name, dca):
    model = small_model(name, dca).train()
    x = torch.randn(2, 3, 64, 64)
    y = model(x)
    assert y.shape == (2, 1, 64, 64)
    y.sum().backward()
    skip = NO_GRAD.get((name, dca), set())
    for pname, p in model.named_parameters():
        if pname in skip:
            assert p.grad is None, f"{pname} was expected to get no gradient"
        else:
            assert p.grad is not None, f"{name} dca={dca}: no gradient reaches {pname}"
            assert torch.isfinite(p.grad).all(), pname
    assert (model.dca is not None) == dca


@pytest.mark.parametrize("name,dca", VARIANTS)
def test_any_size_and_batch_gives_output_at_input_size(name, dca):
    model = small_model(name, dca, num_classes=2).eval()
    sizes = [(3, 50, 63), (1, 33, 47)]
    # A large odd size too, except where it is slow here: DoubleU-Net's full-width VGG-19, and
    # ResUNet++ with DCA (patch 4: 5120 tokens, 5120 x 5120 spatial attention maps).
    if name != "doubleunet" and not (name == "resunetpp" and dca):
        sizes.append((1, 250, 317))
    with torch.no_grad():
        for b, h, w in sizes:
            y = model(torch.randn(b, 3, h, w))
            assert y.shape == (b, 2, h, w), (name, dca, b, h, w)
            assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_paper_configuration_parameter_counts(name):
    got = tuple(count(build_model(name, dca=d)) for d in (False, True))
    if name == "doubleunet":
        for g, ref in zip(got, DOUBLEUNET_PAPER):
            assert abs(g - ref) / ref < 0.01, (got, DOUBLEUNET_PAPER)
    else:
        assert got == PAPER_PARAMS[name]


class _StopAtDCA(Exception):
    pass


@pytest.mark.parametrize("name", NAMES)
def test_dca_token_grid_at_training_size_is_input_over_patch(name):
    """At the paper's 224 x 224, every stage's skip has size 224 / 2^i and DCA's token grid is
    224 / patch_size (28 for patch 8; 56 for ResUNet++'s patch 4), as in the reference."""
    model = small_model(name, True).eval()
    patch = model.config["patch_size"]
    seen = {}

    def hook(module, args):
        skips = args[0]
        seen["grid"] = module.token_grid(skips)
        seen["sizes"] = [tuple(s.shape[-2:]) for s in skips]
        raise _StopAtDCA   # the decoder is not needed for this check

    dcas = [m for m in model.modules() if isinstance(m, DCA)]
    assert dcas
    dcas[0].register_forward_pre_hook(hook)
    with torch.no_grad(), pytest.raises(_StopAtDCA):
        model(torch.randn(1, 3, 224, 224))
    assert seen["grid"] == (224 // patch, 224 // patch)
    assert seen["sizes"] == [(224 >> i, 224 >> i) for i in range(len(seen["sizes"]))]
    assert len(seen["sizes"]) == (3 if name == "resunetpp" else 4)


@pytest.mark.parametrize("name", ["unet", "resunetpp", "doubleunet"])
def test_capture_attention_leaves_outputs_unchanged_and_maps_are_distributions(name):
    model = small_model(name, True).eval()
    x = torch.randn(2, 3, 48, 80)   # a non-square input: grid 6 x 10 (patch 8) or 12 x 20 (patch 4)
    with torch.no_grad():
        plain = model(x)
        with capture_attention(model) as records:
            captured = model(x)
    assert (plain - captured).abs().max().item() <= 1e-5
    assert len(records) == sum(isinstance(m, DCA) for m in model.modules())
    for rec in records:
        ph, pw = rec.grid
        n = ph * pw
        total = sum(rec.features)
        assert len(rec.cca) == len(rec.sca) == 1   # one DCA block
        for stage, c in enumerate(rec.features):
            cca, sca = rec.cca[0][stage], rec.sca[0][stage]
            assert cca.shape == (2, 1, c, total)
            assert sca.shape == (2, 4, n, n)
            for att in (cca, sca):
                torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1]), atol=1e-5, rtol=0)
            assert rec.tokens[stage].shape == (2, n, c)


def _reference_names_vnet() -> list[str]:
    """Parameter/buffer names the reference 2D V-Net uses (no fixture exists for it)."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    wb = lambda p: [f"{p}.weight", f"{p}.bias"]   # noqa: E731
    norm = lambda p: [f"{p}.{s}" for s in bn]     # noqa: E731

    def layers(p, depth):
        out = []
        for j in range(depth):
            out += wb(f"{p}.conv.{j}.conv")
            if j < depth - 1:
                out += norm(f"{p}.conv.{j}.bn") + [f"{p}.conv.{j}.prelu.weight"]
        return out

    keys = wb("conv1.conv") + wb("conv1.conv_skip") + norm("conv1.bn") + ["conv1.prelu.weight"]
    for i, depth in zip(range(2, 6), (2, 3, 3, 3)):
        keys += wb(f"conv{i}.down") + layers(f"conv{i}", depth) + norm(f"conv{i}.bn") + [f"conv{i}.prelu.weight"]
    for i, depth in zip(range(1, 4), (3, 3, 2)):
        keys += wb(f"up{i}.up") + norm(f"up{i}.bn_in") + [f"up{i}.prelu_in.weight"] + layers(f"up{i}", depth)
        keys += norm(f"up{i}.bn") + [f"up{i}.prelu.weight"]
    keys += wb("up4.up") + norm("up4.bn_in") + ["up4.prelu_in.weight"] + wb("up4.conv")
    return keys + norm("up4.bn") + ["up4.prelu.weight"] + wb("out")


def test_vnet_reference_names_map_one_to_one_onto_ours():
    from src_models.registry import official_key_map
    convert = official_key_map("vnet")
    ours = build_model("vnet", dca=False, width=SMALL).state_dict()
    mapped = [convert(k) for k in _reference_names_vnet()]
    assert None not in mapped
    assert sorted(mapped) == sorted(ours)
