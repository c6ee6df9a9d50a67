"""Backbones: registry, shapes, published sizes, layouts, precision, gradients.

Large models are built on the `meta` device (shapes only, no memory, no compute), which
is enough for shapes, parameter counts and FLOP counts. Real CPU forward/backward passes
use only iresnet18 and mobilefacenet. Run with `-s` to see the measured sizes.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainer.backbones import available_backbones, get_backbone

SMALL = ["iresnet18", "mobilefacenet"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPU passes here are small; one thread keeps them from crowding shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        return get_backbone(name)


def _meta_input(batch: int) -> torch.Tensor:
    return torch.empty(batch, 3, 112, 112, device="meta")


def _gmacs(model: nn.Module) -> float:
    """Convolution + linear multiply-accumulates of one 112x112 image, in G.

    FlopCounterMode counts 2 FLOPs per multiply-accumulate; insightface reports MACs."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(_meta_input(1))
    return counter.get_total_flops() / 2 / 1e9


def _calibrated(name: str, embedding_size: int) -> nn.Module:
    """A CPU model in eval mode whose BatchNorm statistics are those of one random batch.

    With the default running stats (mean 0, var 1) eval-mode IResNet activations grow to
    ~1e8 and absolute tolerances mean nothing; calibrated outputs are O(1)."""
    torch.manual_seed(0)
    model = get_backbone(name, embedding_size=embedding_size)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: after one batch, running = batch stats
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 112, 112))
    return model.eval()


def test_registry_names():
    assert available_backbones() == sorted(
        ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet",
         "vit_b", "vit_h", "vit_l", "vit_s", "vit_t"]
    )


def test_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError) as err:
        get_backbone("resnet9000")
    message = str(err.value)
    assert "'resnet9000'" in message
    assert all(name in message for name in available_backbones())


@pytest.mark.parametrize("name", available_backbones())
def test_forward_shape(name):
    assert _meta_model(name).train()(_meta_input(2)).shape == (2, 512)


# ViTs apply `dropout` in every block (arcface_torch's drop_rate): tests/trainer/test_vit.py
@pytest.mark.parametrize("name", [n for n in available_backbones() if not n.startswith("vit_")])
def test_embedding_size_and_dropout_are_applied(name):
    with torch.device("meta"):
        model = get_backbone(name, embedding_size=128, dropout=0.4)
    assert model.eval()(_meta_input(2)).shape == (2, 128)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.4]


@pytest.mark.parametrize("name", SMALL)
def test_wrong_input_size_is_rejected(name):
    with pytest.raises(ValueError, match="112x112"):
        _meta_model(name)(torch.empty(2, 3, 96, 96, device="meta"))


@pytest.mark.parametrize("name, published_m", [("iresnet50", 43.6), ("iresnet100", 65.2)])
def test_parameter_count_matches_published(name, published_m):
    params = sum(p.numel() for p in _meta_model(name).parameters())
    print(f"\n{name}: {params / 1e6:.3f} M parameters (published {published_m} M)")
    assert params == pytest.approx(published_m * 1e6, rel=0.02)


def test_mobilefacenet_parameter_count():
    # arcface_torch's mbf (scale 2) publishes no parameter count; 2.06 M is this model
    # measured (the ~1.2 M often quoted is the narrower original MobileFaceNet at 512-d).
    params = sum(p.numel() for p in _meta_model("mobilefacenet").parameters())
    print(f"\nmobilefacenet: {params / 1e6:.3f} M parameters")
    assert params == pytest.approx(2.06e6, rel=0.01)


@pytest.mark.parametrize(
    "name, published_g",
    # insightface arcface_torch README (r18/r200 from its ViT table, mbf "mobilefacenet-0.45G").
    [
        ("iresnet18", 2.6),
        ("iresnet50", 6.3),
        ("iresnet100", 12.1),
        ("iresnet200", 23.5),
        ("mobilefacenet", 0.45),
    ],
)
def test_flops_match_published(name, published_g):
    gmacs = _gmacs(_meta_model(name))
    print(f"\n{name}: {gmacs:.4f} GMACs conv+linear (published {published_g} G)")
    # insightface counts with ptflops, which also adds one op per BN/PReLU output element:
    # +0.3% for the IResNets, +3.3% for mobilefacenet (0.4375 -> 0.452); the bare conv +
    # linear count is 2.8% under the published 0.45, hence 3% there.
    assert gmacs == pytest.approx(published_g, rel=0.03 if name == "mobilefacenet" else 0.02)


@pytest.mark.parametrize("name", SMALL)
def test_channels_last_matches_contiguous(name):
    model = _calibrated(name, embedding_size=64)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        converted = []  # modules whose 4-D output fell back to the contiguous layout

        def check_layout(module: nn.Module, _: object, out: torch.Tensor) -> None:
            spatial = out.dim() == 4 and out.shape[-1] > 1
            if spatial and not out.is_contiguous(memory_format=torch.channels_last):
                converted.append(type(module).__name__)

        for module in model.modules():
            module.register_forward_hook(check_layout)
        actual = model(x.to(memory_format=torch.channels_last))
    assert converted == []
    assert expected.abs().max() > 0.1  # calibrated: the tolerance is meaningful
    # Measured differences are 2e-5..4e-5 on O(1) outputs: the channels_last kernels sum
    # in another order, compounded over 18+ layers (in float64 they agree to 1e-13).
    # A layout bug (e.g. a flatten in the wrong order) gives O(1) errors.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", SMALL)
def test_bfloat16_autocast_output_is_finite_and_close(name):
    model = _calibrated(name, embedding_size=64)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16  # the model does not force its own precision
    assert torch.isfinite(out).all()
    cosine = nn.functional.cosine_similarity(out.float(), reference)
    assert (cosine > 0.99).all(), cosine


@pytest.mark.parametrize("name", SMALL)
def test_backward_reaches_first_conv(name):
    torch.manual_seed(0)
    model = get_backbone(name, embedding_size=64).train()
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 64)
    out.square().sum().backward()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 3
    grad = first_conv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    if name.startswith("iresnet"):  # arcface_torch freezes the output BN's scale at 1.0
        assert not model.features.weight.requires_grad
        assert torch.equal(model.features.weight, torch.ones(64))
        assert model.features.weight.grad is None and model.features.bias.grad is not None


@pytest.mark.parametrize(
    "name, key, shape",
    [
        ("iresnet50", "layer3.0.downsample.0.weight", (256, 128, 1, 1)),
        ("iresnet50", "fc.weight", (512, 512 * 7 * 7)),
        ("mobilefacenet", "layers.1.layers.0.weight", (128, 2, 3, 3)),
        ("mobilefacenet", "features.layers.0.layers.0.weight", (512, 1, 7, 7)),
        ("mobilefacenet", "features.layers.2.weight", (512, 512)),
        ("mobilefacenet", "features.layers.3.running_var", (512,)),
    ],
)
def test_state_dict_names_match_arcface_torch(name, key, shape):
    # arcface_torch checkpoints load unchanged only if names and shapes agree.
    assert _meta_model(name).state_dict()[key].shape == shape
