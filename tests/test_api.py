"""The Python API (``kdcli.analyze``, ``kdcli.compress``, ``kdcli.export``): its doctests, the typed
reports it returns, the recipe forms it takes, and ``import kdcli`` staying torch-free."""

from __future__ import annotations

import doctest
import inspect
import subprocess
import sys

import pytest
import torch

import kdcli
import kdcli.api
from kdcli.config.recipe import builtin_recipe_path, load_recipe
from kdcli.errors import InputError
from kdcli.reports.analysis_model import AnalysisReport
from kdcli.reports.compress_model import CompressReport
from kdcli.reports.models import ExportReport

SETS = ["teacher.train.epochs=3", "distill.train.epochs=1", "prune.steps=1", "prune.final_epochs=1",
        "export.enabled=false", "target.max_accuracy_drop=0.2"]


def test_the_docstring_examples_run():
    """Every example in kdcli.api's docstrings (the three calls on the quickstart among them)."""
    result = doctest.testmod(kdcli.api, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result


def test_import_kdcli_stays_torch_free():
    code = ("import sys, kdcli\n"
            "assert callable(kdcli.analyze) and callable(kdcli.export) and callable(kdcli.compress)\n"
            "print(sorted(m for m in ('torch', 'pydantic', 'onnx', 'typer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_subpackages_named_like_the_functions_still_import():
    import kdcli.export.onnx as onnx_module
    from kdcli.analyze.analysis import analyze as library_analyze

    assert kdcli.export.onnx is onnx_module and kdcli.analyze.analysis.analyze is library_analyze
    assert sys.modules["kdcli.export"] is kdcli.export  # the package itself, made callable
    assert list(inspect.signature(kdcli.export).parameters)[:3] == ["student", "teacher", "out"]
    assert "recipe" in inspect.signature(kdcli.analyze).parameters
    assert list(inspect.signature(kdcli.compress).parameters)[:2] == ["recipe", "out_dir"]
    assert kdcli.compress.__doc__ == kdcli.api.compress.__doc__


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A quickstart compressed through the API from a Recipe object: (run dir, report)."""
    out = tmp_path_factory.mktemp("api") / "run"
    recipe = load_recipe(builtin_recipe_path("quickstart"), SETS)
    return out, kdcli.compress(recipe, out_dir=out, device="cpu")


def test_compress_returns_the_typed_report_of_the_run(run):
    out, report = run
    assert isinstance(report, CompressReport) and report.run_dir == str(out)
    assert report.student.macs_ratio <= 0.3 + 1e-3 and report.student.macs < report.teacher.macs
    assert 0.5 < report.student.val_accuracy <= 1 and report.steps and report.steps[0].accepted
    assert report.export is None and report.data is not None
    # the same report compress_report.json holds
    assert report.to_json() == CompressReport.model_validate_json((out / "compress_report.json").read_text()).to_json()


def test_compress_takes_yaml_text_as_a_recipe_object_gives_the_same_run(run, tmp_path):
    _, by_object = run
    text = builtin_recipe_path("quickstart").read_text()
    by_text = kdcli.compress(text, out_dir=tmp_path / "run", overrides=SETS, device=torch.device("cpu"))
    assert by_text.student.macs == by_object.student.macs
    assert by_text.student.val_accuracy == pytest.approx(by_object.student.val_accuracy, abs=1e-9)


def test_analyze_a_model_file_writes_and_returns_the_analysis(run, tmp_path):
    """Static figures only (the docstring example measures them on data): typed, and written."""
    out, report = run
    analysis = kdcli.analyze(out / "student.kdc", out_dir=tmp_path / "an", target_macs=0.5, device="cpu")
    assert isinstance(analysis, AnalysisReport) and analysis.data is None
    assert analysis.model.macs == report.student.macs and analysis.model.pruned
    assert analysis.model.input_shape == [1, 8, 8] and [g.name for g in analysis.groups]
    assert analysis.settings.target_macs == 0.5 and analysis.files and "analysis.json" in analysis.files
    assert (tmp_path / "an" / "analysis.json").is_file()


def test_export_lists_failed_gates_without_raising_and_leaves_a_module_where_it_was(tmp_path):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).train()
    report = kdcli.export(net, out=tmp_path, recipe="quickstart", batch_sizes=[1], latency_budget_s=0.02,
                          fail_if=["latency_ms > 0"])
    assert isinstance(report, ExportReport)
    assert report.accuracy is not None and report.accuracy.samples > 0  # the recipe's data judged it
    assert len(report.gates.failures) == 1 and "latency_ms > 0" in report.gates.failures[0]
    assert net.training and (tmp_path / "student.onnx").is_file()  # a copy was exported


def test_compress_resumes_a_finished_run_to_the_same_result(run):
    out, report = run
    again = kdcli.compress(resume=out, device="cpu")
    assert again.student.macs == report.student.macs and again.steps == report.steps


def test_bad_input_is_a_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match="recipe file not found"):
        kdcli.compress(tmp_path / "missing.yaml", out_dir=tmp_path / "run")
    with pytest.raises(InputError, match=r"--log 'wandb': expected"):
        kdcli.compress(out_dir=tmp_path / "run", log=["wandb"])
    with pytest.raises(InputError, match="resume continues a run with its own recipe"):
        kdcli.compress(resume=tmp_path, overrides=["seed=1"])
    with pytest.raises(InputError, match="needs input_shape and num_classes"):
        kdcli.analyze(torch.nn.Linear(4, 2))
    with pytest.raises(InputError, match=r"^recipe:4: prune\.steps"):  # YAML text: named by its line
        kdcli.compress("teacher:\n  model: mlp\nprune:\n  steps: 0\n", out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_export_takes_a_baseline_report_for_its_gates(tmp_path):
    import torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    kw = dict(input_shape=(1, 8, 8), num_classes=10, batch_sizes=[1], latency_budget_s=0.05)
    kdcli.export(net, out=tmp_path / "a", **kw)
    gates = ["latency_ms@1 > baseline.latency_ms@1 * 100", "latency_ms@1 > baseline.latency_ms@1 * 0.001"]
    report = kdcli.export(net, out=tmp_path / "b", baseline=tmp_path / "a" / "report.json", fail_if=gates, **kw)
    assert len(report.gates.failures) == 1 and "* 0.001" in report.gates.failures[0]
    with pytest.raises(InputError, match="baseline"):
        kdcli.export(net, out=tmp_path / "c", fail_if=gates[:1], **kw)
