"""The command line end to end, through Typer's test runner and (for start-up) a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcli.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# A quickstart cut down to seconds: fewer epochs, two pruning steps, short latency runs.
FAST = ["--set", "teacher.train.epochs=8", "--set", "distill.train.epochs=2", "--set", "prune.steps=2",
        "--set", "prune.final_epochs=1", "--set", "export.latency_budget_s=0.1",
        "--set", "export.batch_sizes=[1, 8]"]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_help_does_not_import_torch():
    code = "import sys; from kdcli.cli import main; sys.argv=['kdcli','--help']\ntry: main()\nexcept SystemExit: pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "compress" in out and out.strip().endswith("NO-TORCH")


@pytest.mark.parametrize("cmd", [["train"], ["compress"], ["export"], ["analyze"], ["recipe", "validate"]])
def test_every_command_has_help(cmd):
    res = invoke(*cmd, "--help")
    assert res.exit_code == 0 and "Usage" in res.output


def test_version():
    from kdcli import __version__

    res = invoke("--version")
    assert res.exit_code == 0 and __version__ in res.output


def test_recipe_validate_ok_and_bad(tmp_path):
    assert invoke("recipe", "validate", REPO / "recipes" / "quickstart.yaml").exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  model: mlp\nprune:\n  steps: 0\n")
    res = invoke("recipe", "validate", bad)
    assert res.exit_code == 2
    assert f"{bad}:4: prune.steps" in res.output and "Traceback" not in res.output
    res = invoke("recipe", "validate", tmp_path / "missing.yaml")
    assert res.exit_code == 2 and "not found" in res.output


def test_bad_device_is_a_usage_error(tmp_path):
    res = invoke("train", "--device", "tpu", "--out", tmp_path / "t.kdc")
    assert res.exit_code == 2 and "--device" in res.output


def test_bad_override_names_the_field(tmp_path):
    res = invoke("compress", "--out", tmp_path / "run", "--set", "prune.importance=psychic")
    assert res.exit_code == 2 and "prune.importance" in res.output


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """One FAST quickstart run for the tests below: (run directory, result of `compress --json`)."""
    run = tmp_path_factory.mktemp("quickstart") / "run"
    res = invoke("compress", REPO / "recipes" / "quickstart.yaml", "--out", run, "--json", "--threads", "1", *FAST)
    return run, res


def test_quickstart_end_to_end(quickstart, tmp_path):
    run, res = quickstart
    # With FAST the gate is met (MACs 0.299 of the teacher; accuracy within 2 points): exit 0.
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["target_met"] is True and result["gate_failures"] == []
    assert "step 1:" in res.stderr and "teacher" in res.stderr  # --json keeps the progress, on stderr
    assert result["student"]["macs"] <= 0.3 * result["teacher"]["macs"] * 1.0001
    assert result["teacher"]["val_accuracy"] - result["student"]["val_accuracy"] <= 0.02
    assert [s["step"] for s in result["steps"] if s["accepted"]] == [1, 2]  # prune.steps=2
    for name in ("recipe.yaml", "metrics.jsonl", "student.kdc", "teacher.kdc", "compress_report.md",
                 "compress_report.html", "export/student.onnx", "export/report.json"):
        assert (run / name).is_file(), name
    assert result["export"]["student"]["verification"]["max_abs_diff"] <= 1e-4
    # A second start in the same directory is refused (nothing produced is lost) ...
    again = invoke("compress", REPO / "recipes" / "quickstart.yaml", "--out", run, *FAST)
    assert again.exit_code == 2 and "--resume" in again.output
    # ... and the student file exports on its own, with no recipe.
    res = invoke("export", run / "student.kdc", "--out", tmp_path / "exp", "--batch-sizes", "1", "--json")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "exp" / "student.onnx").is_file()
    # A CI gate that fails exits 3, names the gate, and still writes the report that says so.
    res = invoke("export", run / "student.kdc", "--teacher", run / "teacher.kdc", "--out", tmp_path / "gated",
                 "--batch-sizes", "1", "--fail-if", "macs_ratio > 0.9", "--fail-if", "macs_ratio > 0.29")
    assert res.exit_code == 3, res.output
    assert "macs_ratio > 0.29" in res.output and "macs_ratio > 0.9'" not in res.output
    written = json.loads((tmp_path / "gated" / "report.json").read_text())
    assert len(written["gates"]["failures"]) == 1


def test_unmet_gate_exits_3_and_keeps_the_student(quickstart, tmp_path):
    """An impossible target (1 % of the MACs with no accuracy lost), on the quickstart's trained
    teacher: the MACs are reached but accuracy is not kept, so exit 3 naming the accuracy drop,
    and the student is still written."""
    teacher = quickstart[0] / "teacher.kdc"
    assert teacher.is_file()
    run = tmp_path / "run"
    res = invoke("compress", REPO / "recipes" / "quickstart.yaml", "--out", run, "--no-export", "--json", *FAST,
                 "--set", f"teacher.checkpoint={teacher}", "--set", "target.macs=0.01",
                 "--set", "target.max_accuracy_drop=0.0", "--set", "prune.steps=1", "--set", "prune.max_retries=0")
    assert res.exit_code == 3, res.output
    assert "training teacher" not in res.stderr  # the given teacher was used, not trained again
    result = json.loads(res.stdout)
    assert result["target_met"] is False and result["export"] is None
    assert result["student"]["macs"] <= 0.01 * result["teacher"]["macs"] * 1.0001
    [failure] = result["gate_failures"]
    assert re.fullmatch(r"accuracy drop \d+\.\d\d pt > max_accuracy_drop 0\.00 pt", failure), failure
    assert f"error: {failure}" in res.stderr  # the one-line error names it too
    assert (run / "student.kdc").is_file()


def test_export_of_a_garbage_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    res = invoke("export", bad, "--model", "mlp", "--input-shape", "1,8,8", "--num-classes", "10",
                 "--out", tmp_path / "e")
    assert res.exit_code == 2
    assert str(bad) in res.output and "Traceback" not in res.output
    res = invoke("export", bad, "--model", "mlp", "--out", tmp_path / "e")
    assert res.exit_code == 2 and "--input-shape" in res.output
    assert not (tmp_path / "e" / "student.onnx").exists()


@pytest.mark.parametrize("name, schema_id", [("recipe", "urn:kdcli:schema:recipe:"),
                                             ("analysis", "urn:kdcli:schema:analysis:1"),
                                             ("compress-report", "urn:kdcli:schema:compress-report:1"),
                                             ("export-report", "urn:kdcli:schema:export-report:1")])
def test_schema_prints_each_json_schema_with_its_id(name, schema_id):
    res = invoke("schema", name)
    assert res.exit_code == 0 and json.loads(res.output)["$id"].startswith(schema_id)


def test_schema_of_an_unknown_name_is_exit_2_naming_it():
    res = runner.invoke(app, ["schema", "reprot"])
    assert res.exit_code == 2 and "NAME 'reprot'" in res.output and "compress-report" in res.output


def test_recipe_show_lists_the_built_in_recipes_one_line_each():
    from kdcli.config.recipe import builtin_recipe_path

    res = subprocess.run([sys.executable, "-m", "kdcli", "recipe", "show"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    names = [line.split()[0] for line in lines]
    assert "quickstart" in names and "mnist" in names
    assert all(builtin_recipe_path(n).is_file() for n in names)
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # every recipe has its line
    mnist = next(line for line in lines if line.startswith("mnist "))
    assert "Hinton et al. 2015" in mnist  # "et al." does not end the sentence
    one = subprocess.run([sys.executable, "-m", "kdcli", "recipe", "show", "mnist"], capture_output=True, text=True)
    assert one.stdout == builtin_recipe_path("mnist").read_text()


def test_shell_completion_is_offered():
    """Typer's completion: --install-completion is offered, and the completion protocol the
    installed script speaks (the _KDCLI_COMPLETE environment variable) completes commands."""
    help_text = subprocess.run([sys.executable, "-m", "kdcli", "--help"], capture_output=True, text=True).stdout
    assert "--install-completion" in help_text
    kdcli_script = Path(sys.executable).parent / "kdcli"
    env = {**os.environ, "_KDCLI_COMPLETE": "complete_bash", "COMP_WORDS": "kdcli recipe sh", "COMP_CWORD": "2"}
    res = subprocess.run([str(kdcli_script)], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.split() == ["show"], (res.stdout, res.stderr)


def test_export_warns_on_the_terminal_about_widths_off_the_channel_block(quickstart, tmp_path, monkeypatch):
    """The export report's channel-block warning reaches the terminal, not only report.md."""
    run, _ = quickstart
    block = {"channels": 16, "isa": "AVX-512", "convolutions": 5, "student_off": 3, "teacher_off": 0}
    monkeypatch.setattr("kdcli.export.onnx._channel_block", lambda student, teacher: block)
    res = invoke("export", run / "student.kdc", "--teacher", run / "teacher.kdc", "--out", tmp_path / "exp",
                 "--batch-sizes", "1")
    assert res.exit_code == 0, res.output
    assert "warning: student: 3 of 5 convolutions have output widths that are not a multiple of 16" in res.output
    monkeypatch.setattr("kdcli.export.onnx._channel_block", lambda student, teacher: {**block, "student_off": 0})
    res = invoke("export", run / "student.kdc", "--teacher", run / "teacher.kdc", "--out", tmp_path / "aligned",
                 "--batch-sizes", "1")
    assert res.exit_code == 0 and "channel block" not in res.output, res.output
