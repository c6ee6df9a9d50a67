"""ViT backbones: arcface_torch's own vit.py as the oracle (strict state_dict load, equal
eval outputs), masking and drop path in training, activation checkpointing."""

import importlib.util
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.backbones import get_backbone
from trainer.plan import saved_activation_bytes

ANCHOR = Path(__file__).resolve().parents[3] / "shared/anchors/arcface_torch/backbones/vit.py"
# arcface_torch's get_model arguments for its vit_t and vit_s
ANCHOR_ARGS = {
    "vit_t": dict(embed_dim=256, depth=12, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_s": dict(embed_dim=512, depth=12, drop_path_rate=0.1, mask_ratio=0.1),
}


def _timm_stand_in() -> dict[str, types.ModuleType]:
    """The three timm names vit.py imports (timm would pull torchvision, which does not
    import beside this CPU torch). DropPath is the identity, which it is in eval mode
    (the only mode compared); the initialisers are overwritten by the loaded weights."""
    layers = types.ModuleType("timm.models.layers")

    class DropPath(nn.Module):
        def __init__(self, p):
            super().__init__()

        def forward(self, x):
            return x

    layers.DropPath = DropPath
    layers.to_2tuple = lambda v: (v, v)
    layers.trunc_normal_ = nn.init.trunc_normal_
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.models, models.layers = models, layers
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers}


@pytest.fixture(scope="module")
def anchor_vit():
    if not ANCHOR.exists():
        pytest.skip(f"{ANCHOR} not present")
    saved = {name: sys.modules.get(name) for name in ("timm", "timm.models", "timm.models.layers")}
    sys.modules.update(_timm_stand_in())
    try:
        spec = importlib.util.spec_from_file_location("anchor_vit", ANCHOR)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
    return module


@pytest.mark.parametrize("name", ["vit_t", "vit_s"])
def test_arcface_torch_weights_load_strict_and_outputs_match(anchor_vit, name):
    torch.manual_seed(0)
    theirs = anchor_vit.VisionTransformer(
        img_size=112, patch_size=9, num_classes=512, num_heads=8, norm_layer="ln", **ANCHOR_ARGS[name]
    )
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode uses them
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    ours = get_backbone(name)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.eval()
    ours.eval()
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its torch.cuda.amp.autocast deprecation on CPU
        expected = theirs(x)
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_masking_and_drop_path_only_in_training():
    torch.manual_seed(0)
    model = get_backbone("vit_t", mask_ratio=0.5, drop_path_rate=0.5)
    x = torch.randn(2, 3, 112, 112)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # deterministic in eval
        model.train()
        a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # random masks and dropped paths in training
    kept = get_backbone("vit_t", mask_ratio=0.0, drop_path_rate=0.0).train()
    torch.manual_seed(1)
    c = kept(x)
    torch.manual_seed(2)
    assert torch.equal(c, kept(x))  # nothing random without them (BN in train: batch stats)


def test_vit_defaults_are_arcface_torch_s():
    tiny = get_backbone("vit_t")
    assert tiny.mask_ratio == 0.1 and tiny.blocks[-1].drop_path.p == pytest.approx(0.1)
    with torch.device("meta"):
        huge = get_backbone("vit_h")
    assert huge.mask_ratio == 0.0 and len(huge.blocks) == 48 and huge.embed_dim == 1024


def _grads_and_saved(name, checkpointed, x, **kw):
    torch.manual_seed(0)
    model = get_backbone(name, checkpoint_blocks=checkpointed, **kw).train()
    saved = saved_activation_bytes(model, x)
    torch.manual_seed(5)  # the same masks / drop paths in both runs
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, model.state_dict(), saved


@pytest.mark.parametrize("name, kw", [("vit_t", {"mask_ratio": 0.2}), ("iresnet18", {})])
def test_activation_checkpointing_same_gradients_fewer_saved_bytes(name, kw):
    x = torch.randn(2, 3, 112, 112)
    plain_grads, plain_state, plain_saved = _grads_and_saved(name, False, x, **kw)
    ckpt_grads, ckpt_state, ckpt_saved = _grads_and_saved(name, True, x, **kw)
    assert plain_grads.keys() == ckpt_grads.keys()
    for key, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[key], grad, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in plain_state.items():  # BatchNorm statistics updated once, not twice
        torch.testing.assert_close(ckpt_state[key], value, rtol=0, atol=0, msg=key)
    assert ckpt_saved < 0.5 * plain_saved, (ckpt_saved, plain_saved)
