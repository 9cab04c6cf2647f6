"""The representative architectures of the zoo (ResNet-18, MobileNetV2 with and without SE, a
small ViT): they build for small and large inputs, StructuredPruner prunes them to half the MACs
in round_to blocks, the pruned models export to ONNX within kdcli's tolerance, and their pruning
history replays through a kdcli model file. Tiny widths keep the file to about 30 s on one thread
(five dynamo ONNX exports are most of it)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from kdcli.models.file import load_model_file, save_model_file
from kdcli.errors import ModelError
from kdcli.export.onnx import export_onnx, verify_onnx
from kdcli.models import build_model
from kdcli.models.mobilenet import InvertedResidual, SqueezeExcitation
from kdcli.models.vit import Attention
from kdcli.prune.pruner import StructuredPruner, count_macs_params

CLASSES = 10


def _build(name, args, shape, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, args, input_shape=shape, num_classes=CLASSES)
    model.train()  # BatchNorm statistics that are not the identity, so export must fold them
    with torch.no_grad():
        model(torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5)
    return model.eval()


def _paper_params_resnet18(classes: int) -> int:
    """He et al. 2016 table 1 with torchvision's option-B shortcuts: 7x7 stem, [2, 2, 2, 2] basic blocks."""
    conv = lambda cin, cout, k=3: k * k * cin * cout  # noqa: E731
    total = conv(3, 64, 7) + 2 * 64
    cin = 64
    for planes in (64, 128, 256, 512):
        for _ in range(2):
            total += conv(cin, planes) + conv(planes, planes) + 4 * planes
            if cin != planes:
                total += conv(cin, planes, 1) + 2 * planes
            cin = planes
    return total + 512 * classes + classes


def test_full_width_parameter_counts_and_names():
    r18 = build_model("resnet18", {}, input_shape=(3, 224, 224), num_classes=1000)
    assert sum(p.numel() for p in r18.parameters()) == _paper_params_resnet18(1000) == 11_689_512
    assert r18.conv1.kernel_size == (7, 7) and isinstance(r18.maxpool, nn.MaxPool2d)
    keys = r18.state_dict().keys()
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.running_var", "fc.bias"} <= set(keys)
    mb = build_model("mobilenet_v2", {}, input_shape=(3, 224, 224), num_classes=1000)
    assert sum(p.numel() for p in mb.parameters()) == 3_504_872  # Sandler et al. 2018: 3.4 M + the 1000-way head
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.2.conv.1.0.weight",
            "features.18.1.running_mean", "classifier.1.weight"} <= set(mb.state_dict().keys())
    small = build_model("resnet18", {"width": 0.25}, input_shape=(3, 32, 32), num_classes=10)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    assert [small.get_submodule(f"layer{i}.0.conv1").out_channels for i in (1, 2, 3, 4)] == [16, 32, 64, 128]


def test_small_input_strides_and_vit_patches():
    mb = build_model("mobilenet_v2", {"width_mult": 0.25}, input_shape=(3, 32, 32), num_classes=10)
    feats = mb.features(torch.zeros(1, 3, 32, 32))
    assert feats.shape[-2:] == (4, 4)  # stem and the 24-channel stage at stride 1: 32 / 8
    big = build_model("mobilenet_v2", {"width_mult": 0.25}, input_shape=(3, 96, 96), num_classes=10)
    assert big.features(torch.zeros(1, 3, 96, 96)).shape[-2:] == (3, 3)  # 96 / 32
    vit = build_model("vit", {"dim": 32, "depth": 1, "heads": 2}, input_shape=(3, 224, 224), num_classes=5)
    assert vit.patch_embed.proj.stride == (16, 16) and vit.pos_embed.shape == (1, 14 * 14 + 1, 32)
    assert build_model("vit", {}, input_shape=(3, 32, 32), num_classes=10).pos_embed.shape == (1, 65, 192)
    with pytest.raises(ModelError, match="patch_size 5 must divide"):
        build_model("vit", {"patch_size": 5}, input_shape=(3, 32, 32), num_classes=10)


def _check_multiples_of_8(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % 8 == 0, (name, m)
            assert m.in_channels == 3 or m.in_channels % 8 == 0, (name, m)
        elif isinstance(m, nn.Linear):
            assert m.in_features % 8 == 0, (name, m)
            assert m.out_features == CLASSES or m.out_features % 8 == 0, (name, m)


def _hidden(block: InvertedResidual) -> int:
    return next(m for m in block.conv.modules() if isinstance(m, nn.Conv2d) and m.groups > 1).out_channels


def _check_inverted_residuals(model: nn.Module, fresh: nn.Module) -> int:
    """Every inverted residual's hidden width agrees across expansion, BN, depthwise conv (whose
    groups equal its channels), SE and projection; returns how many are narrower than in ``fresh``."""
    narrowed = 0
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    built = [m for m in fresh.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == len(built) == 17
    for block, orig in zip(blocks, built):
        convs = [m for m in block.conv.modules() if isinstance(m, nn.Conv2d)]
        dw = next(c for c in convs if c.groups > 1)
        hidden = dw.out_channels
        assert dw.in_channels == dw.groups == hidden
        bns = [m for m in block.conv.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(bn.num_features == hidden for bn in bns[:-1])  # the last BN is the projection's
        project = block.conv[-2]
        assert project.in_channels == hidden and bns[-1].num_features == project.out_channels
        if convs[0] is not dw:  # the expansion conv (t = 6)
            assert convs[0].out_channels == hidden
        for se in (m for m in block.modules() if isinstance(m, SqueezeExcitation)):
            assert se.fc1.in_channels == se.fc2.out_channels == hidden
        narrowed += hidden < _hidden(orig)
    return narrowed


CASES = [
    ("resnet18", {"width": 0.25}, (3, 32, 32)),
    ("resnet18", {"width": 0.25}, (3, 224, 224)),
    # small input with SE, large without: every export costs seconds, so not all four
    ("mobilenet_v2", {"width_mult": 0.25, "se": True}, (3, 32, 32)),
    ("mobilenet_v2", {"width_mult": 0.1}, (3, 224, 224)),
    ("vit", {"dim": 64, "depth": 2, "heads": 2}, (3, 32, 32)),
]


@pytest.mark.parametrize("name,args,shape", CASES,
                         ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in a.items())}-{s[1]}" for n, a, s in CASES])
def test_prune_half_the_macs_export_and_replay(name, args, shape, tmp_path):
    model = _build(name, args, shape)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, CLASSES) and torch.isfinite(out).all()

    ex = torch.zeros(1, *shape)
    macs0, params0 = count_macs_params(model, ex)
    p = StructuredPruner(model, ex, round_to=8)
    assert len(p.groups) >= 2
    if name == "vit":
        # the MLP hidden widths prune by channels and the attention blocks by whole heads; the
        # residual stream (LayerNorm statistics) is kept out by the probe, see kdcli/models/vit.py
        assert sorted(p.groups) == ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"]
        assert {g: p.unit(g) for g in p.groups if "qkv" in g} == {"blocks.0.attn.qkv": "head", "blocks.1.attn.qkv": "head"}
        assert p.group_channels()["blocks.0.attn.qkv"] == 2
        assert len(p.notes) == 1 and "1 group kept out" in p.notes[0] and "mlp.fc2" in p.notes[0]
    else:
        assert p.notes == []  # every coupling of these nets is understood, shortcuts included
    before = p.group_channels()
    scores = p.score()
    plan = p.plan_below(scores, p.tau_for_macs(scores, 0.5 * macs0))
    p.apply(plan)

    macs, params = count_macs_params(model, ex)
    assert macs <= 0.5 * macs0 and params < params0
    after = p.group_channels()
    assert any(after[g] < before[g] for g in after)
    _check_multiples_of_8(model)
    if name == "mobilenet_v2":
        assert _check_inverted_residuals(model, build_model(name, args, input_shape=shape, num_classes=CLASSES)) > 0
    with torch.no_grad():
        pruned_out = model(x)
    assert pruned_out.shape == (3, CLASSES) and torch.isfinite(pruned_out).all()

    path = tmp_path / "m.onnx"
    res = export_onnx(model, torch.randn(2, *shape), path)
    assert res["exporter"] == "torch.export" and res["notes"] == []
    ver = verify_onnx(path, model, x)  # kdcli's tolerance: max |Δ| <= 1e-4, top-1 agrees
    assert ver["max_abs_diff"] <= 1e-4 and ver["top1_agreement"] == 1.0

    kdc = tmp_path / "m.kdc"
    save_model_file(kdc, model, name=name, args=args, input_shape=shape, num_classes=CLASSES,
                    pruning_history=p.history(), metadata={})
    loaded, info = load_model_file(kdc)
    assert info["pruning_history"] == p.history() and len(p.history()) == len(plan)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned_out)


def _vit(heads=4):
    return _build("vit", {"dim": 64, "depth": 2, "heads": heads}, (3, 32, 32))


def test_vit_whole_head_removal_equals_zeroing_the_head():
    """A group rooted at proj's input channels (as torch-pruning roots attention groups) removes
    one head's q, k and v rows and proj columns; the heads left compute what they did."""
    model = _vit()
    attn = model.blocks[0].attn
    hd, dim = attn.head_dim, 64
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for off in (0, dim, 2 * dim):  # head 1 of q, k and v
            zeroed.blocks[0].attn.qkv.weight[off + hd:off + 2 * hd] = 0
            zeroed.blocks[0].attn.qkv.bias[off + hd:off + 2 * hd] = 0
        ref = zeroed(x)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 32, 32), verbose=False)
    dg.get_pruning_group(attn.proj, tp.prune_linear_in_channels, list(range(hd, 2 * hd))).prune()
    assert (attn.num_heads, attn.qkv.out_features, attn.proj.in_features) == (3, 3 * 3 * hd, 3 * hd)
    assert model.attention_heads()[attn.qkv] == 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


def test_vit_heads_prune_with_torch_pruning_num_heads_and_replay(tmp_path):
    """torch-pruning's own head pruning (num_heads = model.attention_heads(), prune_num_heads)
    halves the heads; the model needs no fix-up (the head count follows qkv's size) and the
    history replays through a kdcli model file."""
    model = _vit()
    ex = torch.zeros(1, 3, 32, 32)
    residual = [model.patch_embed.proj] + [m for b in model.blocks for m in (b.attn.proj, b.mlp.fc2, b.mlp.fc1)]
    pruner = tp.pruner.MetaPruner(model, ex, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[model.head] + residual,
                                  num_heads=model.attention_heads(), prune_num_heads=True, prune_head_dims=False,
                                  head_pruning_ratio=0.5,
                                  # cls_token and pos_embed [1, tokens, dim] prune along dim (what it guesses, said)
                                  unwrapped_parameters=[(model.cls_token, 2), (model.pos_embed, 2)])
    pruner.step()
    assert [b.attn.num_heads for b in model.blocks] == [2, 2]
    assert [b.mlp.fc1.out_features for b in model.blocks] == [256, 256]
    history = [[n, bool(o), [int(i) for i in idxs]] for n, o, idxs in pruner.DG.pruning_history()]
    assert [h[:2] for h in history] == [["blocks.1.attn.proj", False], ["blocks.0.attn.proj", False]]
    kdc = tmp_path / "vit.kdc"
    save_model_file(kdc, model, name="vit", args={"dim": 64, "depth": 2, "heads": 4}, input_shape=(3, 32, 32),
                    num_classes=CLASSES, pruning_history=history, metadata={})
    loaded, _ = load_model_file(kdc)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert isinstance(loaded.blocks[0].attn, Attention) and loaded.blocks[0].attn.num_heads == 2
