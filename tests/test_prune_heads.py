"""Attention heads as pruning units (kdcli/prune/heads.py, StructuredPruner): a ViT's qkv group
prunes whole heads, scored per head, outside round_to, in every planner (threshold, ratios, MACs
aim, latency aim), and replays, including timm's layout with a plain ``num_heads`` attribute."""

from __future__ import annotations

import copy

import torch
from torch import nn

from kdcli.export.latency_model import plan_for_latency
from kdcli.models import build_model
from kdcli.prune.heads import attention_heads, head_units
from kdcli.prune.pruner import StructuredPruner, count_macs_params, replay_history

DIM, HEADS = 64, 4
HD = DIM // HEADS
EX = torch.zeros(1, 3, 32, 32)


def _vit(seed=0):
    torch.manual_seed(seed)
    return build_model("vit", {"dim": DIM, "depth": 2, "heads": HEADS}, input_shape=(3, 32, 32), num_classes=10).eval()


def _x(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_head_units_group_the_rows_of_q_k_and_v_of_each_head():
    qkv = nn.Linear(8, 24)  # width 8, head_dim 4: heads 0 and 1
    rows = list(range(24))
    assert head_units(rows, qkv, 4) == [[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19],
                                        [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]]
    assert head_units([4, 5, 6, 7, 12, 13], qkv, 4) == [[0, 1, 2, 3, 4, 5]]  # positions within chans


def test_vit_qkv_groups_prune_whole_heads_equal_to_zeroing_them():
    model = _vit()
    p = StructuredPruner(model, EX, round_to=8)
    assert p.group_channels()["blocks.0.attn.qkv"] == HEADS and p.unit("blocks.0.attn.qkv") == "head"
    assert p.unit("blocks.0.mlp.fc1") == "channel" and p.round_of("blocks.0.attn.qkv") == 1
    x = _x()
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for off in (0, DIM, 2 * DIM):  # head 2 of block 1: its q, k and v rows
            zeroed.blocks[1].attn.qkv.weight[off + 2 * HD:off + 3 * HD] = 0
            zeroed.blocks[1].attn.qkv.bias[off + 2 * HD:off + 3 * HD] = 0
        ref = zeroed(x)
    p.apply({"blocks.1.attn.qkv": [2]})
    attn = model.blocks[1].attn
    assert (attn.num_heads, attn.qkv.out_features, attn.proj.in_features) == (3, 3 * 3 * HD, 3 * HD)
    assert model.blocks[0].attn.num_heads == HEADS
    assert p.group_channels()["blocks.1.attn.qkv"] == 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


def test_heads_are_scored_per_head_and_the_weakest_goes_first():
    model = _vit()
    with torch.no_grad():
        for off in (0, DIM, 2 * DIM):  # head 1 of block 0 made small
            model.blocks[0].attn.qkv.weight[off + HD:off + 2 * HD] *= 0.01
        model.blocks[0].attn.proj.weight[:, HD:2 * HD] *= 0.01
    p = StructuredPruner(model, EX, round_to=8)
    s = p.score()["blocks.0.attn.qkv"]
    assert s.shape == (HEADS,) and int(s.argmin()) == 1 and abs(float(s.mean()) - 1.0) < 1e-5
    assert p.plan_below({"blocks.0.attn.qkv": s}, 0.5) == {"blocks.0.attn.qkv": [1]}


def test_round_to_does_not_round_heads_and_one_head_stays():
    model = _vit()
    p = StructuredPruner(model, EX, round_to=8)
    scores = p.score()
    plan = p.plan_ratios({"blocks.0.attn.qkv": 0.5, "blocks.0.mlp.fc1": 0.5}, scores)
    assert len(plan["blocks.0.attn.qkv"]) == 2  # 2 of 4 heads, not a multiple of 8 heads
    assert len(plan["blocks.0.mlp.fc1"]) % 8 == 0
    assert len(p.plan_below(scores, 1e9)["blocks.0.attn.qkv"]) == HEADS - 1  # never empty


def test_macs_and_latency_aims_take_heads_and_keep_the_model_exportable():
    model = _vit()
    macs0 = count_macs_params(model, EX)[0]
    p = StructuredPruner(model, EX, round_to=8)
    scores = p.score()
    _, plan = p.plan_for_macs(scores, 0.4 * macs0)
    assert p.plan_macs(plan) <= 0.4 * macs0
    assert any(g.endswith("qkv") for g in plan), plan  # at 0.4x, attention heads must go too
    lp = plan_for_latency(p, scores, 0.5 * plan_for_latency(p, scores, 1e9).before_ms)
    assert all(len(v) < HEADS for g, v in lp.plan.items() if g.endswith("qkv"))
    p.apply(plan)
    with torch.no_grad():
        assert torch.isfinite(model(_x())).all()


class TimmAttention(nn.Module):
    """timm's layout: a plain ``num_heads`` attribute, the reshape by it (not by -1)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class TinyTimmViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.attn = TimmAttention(32, 4)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):  # x: [B, tokens, 12]
        h = self.embed(x)
        h = h + self.attn(h)
        return self.fc(h.mean(1))


def test_timm_layout_heads_prune_update_num_heads_and_replay():
    torch.manual_seed(0)
    model = TinyTimmViT().eval()
    ex = torch.zeros(1, 6, 12)
    assert attention_heads(model) == {model.attn.qkv: 8}
    p = StructuredPruner(model, ex)
    assert p.unit("attn.qkv") == "head" and p.group_channels()["attn.qkv"] == 4
    x = torch.randn(2, 6, 12)
    with p.trial({"attn.qkv": [0]}):
        assert model.attn.num_heads == 3
        model(x)
    assert model.attn.num_heads == 4  # restored with the weights
    p.apply({"attn.qkv": [0, 3]})
    assert model.attn.num_heads == 2 and model.attn.qkv.out_features == 48
    out = model(x)
    fresh = TinyTimmViT().eval()
    replay_history(fresh, ex, p.history())
    fresh.load_state_dict(model.state_dict())
    assert fresh.attn.num_heads == 2
    torch.testing.assert_close(fresh(x), out)


def test_analyze_names_head_groups_in_heads(tmp_path):
    from kdcli.analyze.analysis import analyze
    from kdcli.reports.analysis import detail_tables
    from kdcli.train.teacher import ModelInfo

    model = _vit()
    res = analyze(model, ModelInfo("vit", {"dim": DIM, "depth": 2, "heads": HEADS}, (3, 32, 32), 10), None,
                  out_dir=tmp_path)
    units = {g["name"]: (g["unit"], g["channels"]) for g in res["groups"]}
    assert units["blocks.0.attn.qkv"] == ("head", HEADS) and units["blocks.0.mlp.fc1"] == ("channel", 4 * DIM)
    rows = {r[0]: r[1] for title, _, rows in detail_tables(res) if title.startswith("prunable groups") for r in rows}
    assert rows["blocks.1.attn.qkv"] == f"{HEADS} heads" and rows["blocks.1.mlp.fc1"] == 4 * DIM


def test_sensitivity_allocation_takes_the_head_the_output_does_not_read():
    """prune.allocation: sensitivity on a ViT: a head whose projection columns are near zero
    costs nothing to remove, so the plan takes it before anything the output reads."""
    from kdcli.dkdp.compress import _Sensitivity

    model = _vit()
    with torch.no_grad():
        model.blocks[1].attn.proj.weight[:, 3 * HD:] *= 1e-4  # block 1's head 3 hardly reaches the stream
    p = StructuredPruner(model, EX, round_to=8)
    total = count_macs_params(model, EX)[0]
    scores = p.score()
    batches = [(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.zeros(16, dtype=torch.long))]
    _, plan = _Sensitivity(p, scores, model, batches, [0.25, 0.5, 0.75]).for_macs(0.97 * total)
    assert p.plan_macs(plan) <= 0.97 * total
    assert plan.get("blocks.1.attn.qkv") == [3], plan
    assert count_macs_params(model, EX)[0] == total
