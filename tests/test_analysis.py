"""``kdcli analyze``: per-layer figures, importance, activation sensitivity, the pruning scan,
suggested ratios, the written files and the CLI's one-line errors."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from kdcli.analyze.analysis import analyze, layer_table
from kdcli.reports.analysis import render_terminal
from kdcli.reports.analysis_model import load_analysis
from kdcli.console import Reporter
from kdcli.data.loader import DataBundle, TensorData
from kdcli.analyze.granularity import GranularityMap
from kdcli.config.recipe import AnalyzeSpec
from kdcli.analyze.sensitivity import (activation_statistics, combine_sensitivity, flag_critical, granularity_map,
                               pca_redundancy, pruning_sensitivity, suggest_ratios)
from kdcli.models.file import ModelInfo

FAST = AnalyzeSpec(ratios=[0.0, 0.5], eval_samples=64, critical_fraction=0.25)


class SmallNet(nn.Module):
    """conv(1→4) BN ReLU, conv(4→6) BN ReLU, pool, linear: two prunable conv groups."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def small_data(n: int = 64, seed: int = 0) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x[:, 0, :3].mean((1, 2)) > 0).long() + (x[:, 0, 3:].mean((1, 2)) > 0.3).long()
    part = TensorData(x, y)
    return DataBundle(part, part, None, 3, (1, 6, 6), [0.0], [1.0], ["a", "b", "c"], "synthetic 6x6",
                      eval_batch_size=32)


def small_model(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    model = SmallNet().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that restoring them is tested
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.1, 0.3)
    return model


INFO = ModelInfo("small", {}, (1, 6, 6), 3)


# ----------------------------------------------------------------------------- per layer


def test_layer_macs_and_params_match_hand_counts_and_the_total():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8, 3))
    rows, macs, params = layer_table(model, torch.zeros(1, 1, 4, 4))
    got = {r["name"]: (r["type"], r["output_shape"], r["params"], r["macs"]) for r in rows}
    assert got == {
        "0": ("Conv2d", [2, 4, 4], 20, 9 * 2 * 16 + 2 * 16),  # 3x3x1 per output, 2 channels, 16 positions + bias
        "1": ("BatchNorm2d", [2, 4, 4], 4, 2 * 32),           # scale and shift per element
        "2": ("ReLU", [2, 4, 4], 0, 32),
        "3": ("MaxPool2d", [2, 2, 2], 0, 32),                 # one op per input element
        "5": ("Linear", [3], 27, 8 * 3 + 3),
    }
    assert macs == 320 + 64 + 32 + 32 + 27 and params == 51
    assert sum(r["macs"] for r in rows) == macs and sum(r["params"] for r in rows) == params
    assert math.isclose(sum(r["macs_share"] for r in rows), 1.0)
    assert rows[0]["macs_share"] == pytest.approx(320 / 475)


def test_resnet20_per_layer_sum_equals_torch_pruning_total():
    from kdcli.models import build_model
    from kdcli.prune.pruner import count_macs_params

    model = build_model("resnet20", {}, input_shape=(3, 32, 32), num_classes=10)
    x = torch.zeros(1, 3, 32, 32)
    rows, macs, params = layer_table(model, x)
    assert (macs, params) == count_macs_params(model, x)
    assert sum(r["macs"] for r in rows) == macs and all(r["name"] != "(other)" for r in rows)
    conv = next(r for r in rows if r["name"] == "layer1.0.conv1")
    assert conv["macs"] == 9 * 16 * 16 * 32 * 32 and conv["output_shape"] == [16, 32, 32]


# ----------------------------------------------------------------------------- importance


def test_a_channel_with_zeroed_weights_ranks_last_on_every_criterion():
    model = small_model()
    with torch.no_grad():  # channel 2 of conv1's group: its filter, BN scale/shift, and conv2's input slice
        model.conv1.weight[2] = 0
        model.bn1.weight[2] = 0
        model.bn1.bias[2] = 0
        model.conv2.weight[:, 2] = 0
    res = analyze(model, INFO, small_data(), settings=FAST)
    imp = next(g for g in res["groups"] if g["name"] == "conv1")["importance"]
    assert set(imp) >= {"magnitude", "bn-scale", "taylor", "activation", "apoz", "mean_activation"}
    for crit in ("magnitude", "magnitude-l1", "bn-scale", "taylor", "activation"):
        assert len(imp[crit]) == 4
        assert min(range(4), key=lambda i: imp[crit][i]) == 2, crit
        assert imp[crit][2] == 0.0
    assert imp["apoz"][2] == 1.0 and imp["mean_activation"][2] == 0.0  # the dead channel never fires


# ----------------------------------------------------------------------------- activation sensitivity


class DeadAndDominant(nn.Module):
    """h0 = relu(x0) drives the prediction (weights ±5), h1 is dead (bias −10; weights ±3),
    h2 = relu(x1) barely matters (weights ±0.2)."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(2, 3)
        self.act = nn.ReLU()
        self.out = nn.Linear(3, 2)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
            self.hidden.bias.copy_(torch.tensor([0.0, -10.0, 0.0]))
            self.out.weight.copy_(torch.tensor([[5.0, 3.0, 0.2], [-5.0, -3.0, -0.2]]))
            self.out.bias.copy_(torch.tensor([-2.5, 2.5]))

    def forward(self, x):
        return self.out(self.act(self.hidden(x)))


def test_activation_sensitivity_flags_the_dominant_neuron_not_the_dead_one():
    model = DeadAndDominant()
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(1))
    batches = [(x[:200], None), (x[200:], None)]
    st = activation_statistics(model, batches, ["act"])["act"]
    # The predicted-class logit's gradient w.r.t. h_j is W[ŷ, j] = ±w_j: its std is 2·w_j·sqrt(p(1−p)).
    p = float((model(x).argmax(1) == 0).float().mean())
    assert 0.1 < p < 0.9
    spread = 2 * math.sqrt(p * (1 - p))
    assert st["grad_std"].tolist() == pytest.approx([5 * spread, 3 * spread, 0.2 * spread], rel=1e-6)
    f0, f2 = float((x[:, 0] > 0).float().mean()), float((x[:, 1] > 0).float().mean())
    assert st["active_fraction"].tolist() == pytest.approx([f0, 0.0, f2])
    # s = (σ / max σ)·f, rescaled to max 1: σ ∝ (5, 3, 0.2), so (f0, 0, 0.04·f2) / f0
    s = combine_sensitivity(st["grad_std"], st["active_fraction"])
    assert s.tolist() == pytest.approx([1.0, 0.0, 0.04 * f2 / f0], rel=1e-6)
    assert flag_critical(s, fraction=0.1).tolist() == [True, False, False]
    assert flag_critical(s, fraction=0.99).tolist() == [True, False, True]  # a dead neuron never is
    assert flag_critical(s, threshold=0.5).tolist() == [True, False, False]
    gmap = granularity_map({"act": st}, critical_fraction=0.1)
    layer = gmap.layers["act"]
    assert layer.critical == [True, False, False]
    assert layer.sensitivity == pytest.approx(s.tolist(), abs=1e-6)
    floor = [v + 0.1 for v in s.tolist()]  # weights ∝ WEIGHT_FLOOR + s, mean 1 over the layer
    assert layer.weight == pytest.approx([v / (sum(floor) / 3) for v in floor], abs=1e-6)


def test_pca_counts_the_directions_a_layer_uses():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2000, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0])
    rows = torch.cat([base, base @ torch.randn(3, 3, generator=g)], 1)  # 6 channels, 3 directions
    r = pca_redundancy(rows)
    assert r["features"] == 6 and r["samples"] == 2000
    assert r["components"]["0.99"] == 3 and r["cumulative"][2] == pytest.approx(1.0, abs=1e-6)
    assert pca_redundancy(torch.zeros(10, 4))["components"] == {"0.9": 0, "0.95": 0, "0.99": 0}


# ----------------------------------------------------------------------------- the scan


def test_ratio_zero_keeps_accuracy_and_the_scan_restores_the_model_bit_identically():
    from kdcli.prune.pruner import StructuredPruner, count_macs_params
    from kdcli.train.loop import evaluate, tensor_batches

    model, data = small_model(), small_data()
    x, y = data.eval_tensors("val")
    batches = tensor_batches(x, y, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out_before = model(x)
    example = torch.zeros(1, 1, 6, 6)
    pruner = StructuredPruner(model, example)
    acc0 = evaluate(model, batches)["accuracy"]
    macs0 = count_macs_params(model, example)[0]
    curves = pruning_sensitivity(pruner, pruner.groups, pruner.score(), [0.0, 0.5, 0.75],
                                 evaluate_fn=lambda: evaluate(model, batches)["accuracy"],
                                 macs_fn=lambda: count_macs_params(model, example)[0])
    assert set(curves) == {"conv1", "conv2"}
    for rows in curves.values():
        assert rows[0] == {"ratio": 0.0, "channels_removed": 0, "accuracy": acc0, "macs": macs0}
        assert rows[1]["macs"] < macs0 and rows[2]["macs"] < rows[1]["macs"]
    assert curves["conv1"][1]["channels_removed"] == 2 and curves["conv2"][2]["channels_removed"] == 4
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(x), out_before) and not model.training


def test_full_analysis_leaves_the_model_as_it_was_and_is_deterministic(tmp_path):
    model, data = small_model(), small_data()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = analyze(model, INFO, data, settings=FAST, seed=3, out_dir=tmp_path / "a")
    b = analyze(model, INFO, data, settings=FAST, seed=3, out_dir=tmp_path / "b")
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    a.pop("timings"), b.pop("timings")
    a["pruning_sensitivity"].pop("seconds"), b["pruning_sensitivity"].pop("seconds")
    assert a == b
    for name in ("granularity.json", "sensitivity.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_suggested_ratios_take_the_cheapest_accuracy_per_mac_first():
    # MACs of the whole model (200) with one group pruned: A saves 40 / 70, B 30 / 60.
    curves = {"A": [{"ratio": 0.5, "accuracy": 0.89, "macs": 160}, {"ratio": 0.9, "accuracy": 0.50, "macs": 130}],
              "B": [{"ratio": 0.5, "accuracy": 0.85, "macs": 170}, {"ratio": 0.9, "accuracy": 0.84, "macs": 140}]}
    s = suggest_ratios(curves, baseline_accuracy=0.9, total_macs=200, target_macs=0.8)
    assert s["ratios"] == {"A": 0.5} and s["predicted_macs"] == 160 and s["reached"]
    assert s["predicted_accuracy"] == pytest.approx(0.89)
    # Then B 0.5 (0.05 for 30 beats A 0.9's 0.39 for 30), then B 0.9 (0.01 for 30 more): 100 MACs.
    s = suggest_ratios(curves, baseline_accuracy=0.9, total_macs=200, target_macs=0.6)
    assert s["ratios"] == {"A": 0.5, "B": 0.9} and s["predicted_macs"] == 100 and s["reached"]
    assert s["predicted_accuracy"] == pytest.approx(0.9 - 0.01 - 0.06)
    assert s["predicted_macs_fraction"] == 0.5
    # A ratio that removes no more channels than the one before (a small group) is stepped over.
    flat = [{"ratio": 0.1, "accuracy": 0.9, "macs": 200}, {"ratio": 0.2, "accuracy": 0.9, "macs": 150}]
    s = suggest_ratios({"A": curves["A"], "C": flat}, baseline_accuracy=0.9, total_macs=200, target_macs=0.75)
    assert s["ratios"] == {"C": 0.2} and s["predicted_macs"] == 150 and s["predicted_accuracy"] == 0.9
    # With an exact count of the combined plan (here: A and B share a layer, 20 MACs less saved), it
    # takes one more step than the additive prediction to reach the target.
    exact = lambda r: 200 - sum(200 - next(p["macs"] for p in curves[g] if p["ratio"] == v)  # noqa: E731
                                for g, v in r.items()) + (20 if len(r) == 2 else 0)
    s = suggest_ratios(curves, baseline_accuracy=0.9, total_macs=200, target_macs=0.7, macs_of=exact)
    assert s["ratios"] == {"A": 0.5, "B": 0.9} and s["predicted_macs"] == 120 and s["reached"]
    assert suggest_ratios(curves, baseline_accuracy=0.9, total_macs=200, target_macs=0.7)["ratios"] == {"A": 0.5, "B": 0.5}
    s = suggest_ratios({"A": curves["A"]}, baseline_accuracy=0.9, total_macs=200, target_macs=20)
    assert not s["reached"] and s["ratios"] == {"A": 0.9} and s["predicted_macs"] == 130


# ----------------------------------------------------------------------------- outputs


def test_outputs_are_written_and_read_back(tmp_path):
    res = analyze(small_model(), INFO, small_data(), settings=FAST, out_dir=tmp_path, target_macs=0.7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis.json", "granularity.json", "report.html",
                                                           "sensitivity.csv"]
    obj = json.loads((tmp_path / "analysis.json").read_text())
    assert list(obj)[:2] == ["$schema", "schema_version"] and obj["$schema"] == "urn:kdcli:schema:analysis:1"
    assert obj["schema_version"] == 1 and obj["suggested_ratios"]["target_macs"] == 0.7
    assert obj == json.loads(json.dumps(res))  # the file is the returned result (validated, then written)
    assert load_analysis(tmp_path / "analysis.json").to_json() == obj
    assert obj["suggested_ratios"]["predicted_macs"] <= 0.7 * obj["model"]["macs"] or not obj["suggested_ratios"]["reached"]
    from kdcli.dkdp.compress import _suggested_ratios

    assert _suggested_ratios(tmp_path / "analysis.json") == obj["suggested_ratios"]["ratios"]
    rows = list(csv.DictReader((tmp_path / "sensitivity.csv").open()))
    assert len(rows) == 2 * 2 and set(rows[0]) == {"group", "ratio", "accuracy", "macs"}
    gmap = GranularityMap.load(tmp_path / "granularity.json")
    assert list(gmap.layers) == list(res["activation_sensitivity"]) == ["relu2"]
    assert len(gmap.layers["relu2"].weight) == 6 and sum(gmap.layers["relu2"].critical) == 2  # ceil(0.25 · 6)
    page = (tmp_path / "report.html").read_text()
    assert "http" not in page.replace("http-equiv", "") and "<script" not in page
    # The page shows analysis.json's figures: the summary, every layer by name, the scan's baseline
    # and suggestion, one sensitivity curve per group, and the critical-feature map of relu2.
    m, scan, sug = obj["model"], obj["pruning_sensitivity"], obj["suggested_ratios"]
    assert f"<td>parameters</td><td>{m['params']:,}</td></tr>" in page and f"<td>MACs</td><td>{m['macs']:,}</td>" in page
    assert f"<td>top-1 (baseline)</td><td>{100 * scan['baseline_accuracy']:.2f}%</td>" in page
    assert all(f"<td>{r['name']}</td>" in page for r in obj["layers"])
    assert f"predicted MACs {sug['predicted_macs_fraction']:.3f} of the model's" in page
    assert page.count('class="lg">conv1</text>') == 1 and page.count('class="lg">conv2</text>') == 1
    charts = re.findall(r'<svg [^>]*aria-label="([^"]*)"', page)
    assert charts[:3] == ["MACs per layer", "Parameters per layer", "Top-1 against pruning ratio (1)"]
    assert "relu2 (6 features)" in charts and charts[-1] == "Explained variance"
    crit = [str(i) for i, c in enumerate(gmap.layers["relu2"].critical) if c]
    assert f"<p><b>relu2</b> critical: {', '.join(crit)}</p>" in page


def test_static_analysis_of_a_pruned_student_file(tmp_path):
    from kdcli.models.file import save_model_file
    from kdcli.prune.pruner import StructuredPruner
    from kdcli.models.file import load_model_any

    model, example = small_model(), torch.zeros(1, 1, 6, 6)
    pruner = StructuredPruner(model, example)
    pruner.prune_ratios({"conv2": 0.5}, pruner.score())
    path = tmp_path / "student.kdc"
    spec = f"{Path(__file__).resolve()}:SmallNet"
    save_model_file(path, model, name=spec, args={}, input_shape=[1, 6, 6],
                    num_classes=3, pruning_history=pruner.history())
    loaded, info = load_model_any(path, spec_name=None, spec_args=None, input_shape=None, num_classes=None,
                                  base_dir=tmp_path, allow=[spec])
    res = analyze(loaded, info, None, out_dir=tmp_path / "out")
    assert res["model"]["pruned"] and res["data"] is None
    assert all(res[k] is None for k in ("activation_sensitivity", "redundancy", "pruning_sensitivity", "suggested_ratios"))
    assert {g["name"]: g["channels"] for g in res["groups"]} == {"conv1": 4, "conv2": 3}
    assert set(res["groups"][1]["importance"]) == {"magnitude", "magnitude-l1", "bn-scale"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["analysis.json", "report.html"]
    static = load_analysis(tmp_path / "out" / "analysis.json")  # the typed model reads the null sections
    assert static.data is None and static.suggested_ratios is None and static.groups[1].layers.norm == ["bn2"]
    stream = _Capture()
    render_terminal(res, Reporter(stream=stream), details=True)
    assert "static figures only" in stream.text and "conv2" in stream.text


class _Capture:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return False


def test_sensitivity_falls_back_to_mean_gradient_when_no_gradient_varies():
    s = combine_sensitivity(torch.zeros(3), torch.tensor([1.0, 1.0, 0.5]), torch.tensor([1.0, 2.0, 2.0]))
    assert s.tolist() == pytest.approx([0.5, 1.0, 0.5])
    assert combine_sensitivity(torch.zeros(2), torch.ones(2)).tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------- through the CLI


def _cli(*args):
    from typer.testing import CliRunner

    from kdcli.cli import app

    return CliRunner().invoke(app, ["analyze", *[str(a) for a in args]], catch_exceptions=False)


def _mlp_file(tmp_path, input_shape=(1, 8, 8)) -> Path:
    from kdcli.models.file import save_model_file
    from kdcli.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [12]}, input_shape=input_shape, num_classes=10)
    path = tmp_path / "mlp.kdc"
    save_model_file(path, model, name="mlp", args={"hidden": [12]}, input_shape=input_shape, num_classes=10)
    return path


def test_cli_bad_checkpoint_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.kdc"
    bad.write_bytes(b"not a checkpoint at all")
    res = _cli(bad)
    assert res.exit_code == 2 and res.output.startswith("error: ") and str(bad) in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    res = _cli(tmp_path / "bad.pt", "--model", "mlp", "--data", "digits")
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_cli_input_shape_mismatch_is_one_line_exit_2(tmp_path):
    res = _cli(_mlp_file(tmp_path, input_shape=(1, 4, 4)), "--data", "digits")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "[1, 8, 8]" in res.output and "[1, 4, 4]" in res.output and len(res.output.strip().splitlines()) == 1


def test_cli_analyze_writes_everything_with_data(tmp_path):
    res = _cli(_mlp_file(tmp_path), "--data", "digits", "--target-macs", "0.6", "--out", tmp_path / "out", "--json")
    assert res.exit_code == 0, res.output
    obj = json.loads(res.output[res.output.index("{"):])
    assert obj["suggested_ratios"]["target_macs"] == 0.6 and obj["data"]["split"] == "val"
    assert [g["name"] for g in obj["groups"]] == ["features.1"] and len(obj["pruning_sensitivity"]["curves"]["features.1"]) == 9
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["analysis.json", "granularity.json", "report.html",
                                                                    "sensitivity.csv"]


# ----------------------------------------------------------------------------- confusable classes


class ConfusesAAndC(nn.Module):
    """Logits W·x through relu(x) − relu(−x): class a (0) and class c (2) are both driven by x0
    (c a little by x2 too), b by x1 and d by x2, so the model spreads its probability over a and c
    on the same inputs."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(3, 6, bias=False)
        self.act = nn.ReLU()
        self.out = nn.Linear(6, 4, bias=False)
        w = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [3.0, 0.0, 0.5], [0.0, 0.0, 3.0]])
        with torch.no_grad():
            self.hidden.weight.copy_(torch.cat([torch.eye(3), -torch.eye(3)]))
            self.out.weight.copy_(torch.cat([w, -w], 1))

    def forward(self, x):
        return self.out(self.act(self.hidden(x)))


def confusing_data() -> DataBundle:
    g = torch.Generator().manual_seed(0)
    train, val = torch.randn(50, 3, generator=g), torch.randn(80, 3, generator=g)
    return DataBundle(TensorData(train, torch.zeros(50, dtype=torch.long)),
                      TensorData(val, torch.randint(0, 4, (80,), generator=g)), None, 4, (3,),
                      [0.0] * 3, [1.0] * 3, ["a", "b", "c", "d"], "synthetic 3-d", eval_batch_size=32)


CONFUSING = ModelInfo("confuses-a-and-c", {}, (3,), 4)


def test_clusters_group_the_confused_classes_and_name_them(tmp_path):
    model, data = ConfusesAAndC(), confusing_data()
    res = analyze(model, CONFUSING, data, settings=FAST, clusters=3, out_dir=tmp_path)
    c = json.loads((tmp_path / "analysis.json").read_text())["clusters"]
    assert c == json.loads(json.dumps(res["clusters"]))
    assert sorted(c["subsets"]) == [[0, 2], [1], [3]]
    assert sorted(c["subset_names"]) == [["a", "c"], ["b"], ["d"]]
    assert c["class_names"] == ["a", "b", "c", "d"] and c["cluster_of_class"][0] == c["cluster_of_class"][2]
    assert len(set(c["cluster_of_class"])) == 3 and res["settings"]["clusters"] == 3
    # Computed on the analysis's evaluation subset (the first 64 validation samples), not the training split.
    assert (c["split"], c["samples"]) == ("val", 64) == (res["data"]["split"], res["data"]["samples"])
    with torch.no_grad():
        probs = torch.softmax(model(data.val.x[:64]), 1).double()
    assert torch.tensor(c["covariance"]) == pytest.approx(torch.cov(probs.T), abs=1e-7)
    corr = torch.corrcoef(probs.T)
    assert torch.tensor(c["correlation"]) == pytest.approx(corr, abs=1e-5)
    others = ~torch.eye(4, dtype=torch.bool)
    others[0, 2] = others[2, 0] = False
    assert corr[0, 2] > 0.8 and corr[others].max() < 0  # every other pair of classes is anti-correlated

    stream = _Capture()
    render_terminal(res, Reporter(stream=stream))
    assert "subset 1/3:" in stream.text and "a, c" in stream.text
    page = (tmp_path / "report.html").read_text()
    section = page[page.index("<h2>Confusable classes</h2>"):]
    assert "<td>a, c</td>" in section and section.count("<svg") == 1 and ">d</text>" in section


def test_clusters_need_data_and_fewer_subsets_than_classes():
    from kdcli.errors import InputError

    res = analyze(ConfusesAAndC(), CONFUSING, None, clusters=2)
    assert res["clusters"] is None and any("--clusters 2 needs data" in n for n in res["notes"])
    for bad in (1, 4):
        with pytest.raises(InputError, match=r"--clusters: expected 2\.\.3 .* got " + str(bad)):
            analyze(ConfusesAAndC(), CONFUSING, confusing_data(), settings=FAST, clusters=bad)


def test_cli_clusters_out_of_range_is_one_line_exit_2(tmp_path):
    res = _cli(_mlp_file(tmp_path), "--clusters", "1")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.startswith("error: --clusters: expected 2..9") and len(res.output.strip().splitlines()) == 1
