"""Run tracking (``kdcli compress --log``): a tiny quickstart logged to TensorBoard and to an
MLflow file store and read back, tracking across ``--resume``, and the optional packages left
unloaded without ``--log``. The read-back tests skip when ``kdcli[tracking]`` is not installed;
the rest run without it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import kdcli.dkdp.compress as C
from kdcli.cli import app
from kdcli.config.recipe import builtin_recipe_path, load_recipe
from kdcli.errors import InputError
from kdcli.tracking import LOG_FORMS, Tracker, open_tracker, parse_log

HAVE_TB = importlib.util.find_spec("tensorboard") is not None
HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None
runner = CliRunner()

# The quickstart in seconds: two prune steps of one distillation epoch, no export.
SETS = ["teacher.train.epochs=3", "distill.train.epochs=1", "prune.steps=2", "prune.final_epochs=1",
        "export.enabled=false", "target.max_accuracy_drop=0.2"]
FAST = [a for s in SETS for a in ("--set", s)] + ["--device", "cpu"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def file_store_env(monkeypatch):
    """MLflow's file-store opt-out as the test found it afterwards (the sink sets it when unset)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One compress run logged to every installed backend: (run dir, tensorboard dir, mlflow URI, result)."""
    if not (HAVE_TB or HAVE_MLFLOW):
        pytest.skip("kdcli[tracking] not installed (tensorboard, mlflow-skinny)")
    root = tmp_path_factory.mktemp("tracked")
    tb, uri = root / "tb", (root / "mlruns").as_uri()
    logs = (["--log", f"tensorboard:{tb}"] if HAVE_TB else []) + (["--log", f"mlflow:{uri}"] if HAVE_MLFLOW else [])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "")
        mp.delenv("MLFLOW_ALLOW_FILE_STORE")
        res = invoke("compress", "--out", root / "run", *FAST, *logs, "--json")
        assert res.exit_code == 0, res.output
    result = json.loads((root / "run" / "result.json").read_text())
    return root / "run", tb, uri, result


def _expected_epochs(result) -> int:
    """Epochs of the student's distillations: each step's, then the final distillation's one."""
    return sum(len(r["train_history"]) for r in result["steps"]) + 1


# ----------------------------------------------------------------------------- read back


def test_tensorboard_holds_steps_epochs_and_the_result(tracked):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, tb, _, result = tracked
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"step/tau", "step/macs_ratio", "step/params_ratio", "step/val_accuracy", "step/accepted",
            "epoch/train_loss", "epoch/val_accuracy", "teacher_train/train_loss", "final/macs_ratio",
            "final/target_met"} <= tags
    attempts = [r["attempt"] for r in result["steps"]]
    assert [e.step for e in acc.Scalars("step/macs_ratio")] == attempts
    assert [e.value for e in acc.Scalars("step/macs_ratio")] == pytest.approx([r["macs_ratio"] for r in result["steps"]])
    assert len(acc.Scalars("epoch/train_loss")) == _expected_epochs(result)
    assert len(acc.Scalars("teacher_train/train_loss")) == 3  # teacher.train.epochs
    # each distillation term of the quickstart (kd + ce), per epoch, unweighted
    assert {"epoch/loss/kd", "epoch/loss/ce"} <= tags
    assert len(acc.Scalars("epoch/loss/kd")) == _expected_epochs(result)
    kd_weight, ce_weight = 0.9, 0.1
    for total, kd, ce in zip(acc.Scalars("epoch/train_loss"), acc.Scalars("epoch/loss/kd"), acc.Scalars("epoch/loss/ce")):
        assert total.value == pytest.approx(kd_weight * kd.value + ce_weight * ce.value, rel=1e-3)
    assert acc.Scalars("final/macs_ratio")[0].value == pytest.approx(result["student"]["macs_ratio"])
    assert {"recipe/text_summary", "step/reason/text_summary", "report/text_summary"} <= set(acc.Tags()["tensors"])


def test_mlflow_holds_metrics_params_and_the_reports(tracked, file_store_env):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir, _, uri, result = tracked
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("kdcli")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["kdcli.run_dir"] == str(run_dir.resolve())
    assert {"step/tau", "step/macs_ratio", "step/params_ratio", "step/val_accuracy", "step/accepted",
            "epoch/train_loss", "epoch/val_accuracy", "final/val_accuracy", "final/macs_ratio"} <= set(run.data.metrics)
    assert run.data.params["prune.steps"] == "2" and run.data.params["distill.losses.0.kind"] == "kd"
    history = client.get_metric_history(run.info.run_id, "step/macs_ratio")
    assert [m.step for m in history] == [r["attempt"] for r in result["steps"]]
    assert len(client.get_metric_history(run.info.run_id, "epoch/train_loss")) == _expected_epochs(result)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"compress_report.json", "compress_report.md", "compress_report.html", "recipe.yaml",
            "metrics.jsonl", "result.json"} <= artifacts


def test_resume_continues_the_same_tracking_run(tmp_path, monkeypatch, file_store_env):
    """Killed in its second step, then resumed: one MLflow run (KILLED, then FINISHED) with every
    attempt; a second TensorBoard event file beside the first. Nothing crashes."""
    if not (HAVE_TB or HAVE_MLFLOW):
        pytest.skip("kdcli[tracking] not installed (tensorboard, mlflow-skinny)")
    uri = (tmp_path / "mlruns").as_uri()
    logs = ([f"tensorboard:{tmp_path / 'tb'}"] if HAVE_TB else []) + ([f"mlflow:{uri}"] if HAVE_MLFLOW else [])
    recipe, run_dir = C.start_run(builtin_recipe_path("quickstart"), out_dir=tmp_path / "run",
                                  overrides=[*SETS, "device=cpu"])
    calls, real = {"n": 0}, C._distil

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # during the second step's distillation
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "_distil", dying)
    with pytest.raises(KeyboardInterrupt):
        C.compress(recipe, run_dir, device=torch.device("cpu"), tracker=open_tracker(logs))
    if HAVE_MLFLOW:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp_id = client.get_experiment_by_name("kdcli").experiment_id
        assert [r.info.status for r in client.search_runs([exp_id])] == ["KILLED"]
    monkeypatch.setattr(C, "_distil", real)
    result = C.compress(C.resume_recipe(run_dir), run_dir, device=torch.device("cpu"), tracker=open_tracker(logs))
    attempts = [r["attempt"] for r in result.steps]
    if HAVE_MLFLOW:
        (run,) = client.search_runs([exp_id])
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "step/macs_ratio")] == attempts
    if HAVE_TB:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
        acc = EventAccumulator(str(tmp_path / "tb"))
        acc.Reload()
        assert [e.step for e in acc.Scalars("step/macs_ratio")] == attempts


# ----------------------------------------------------------------------------- without the packages


def test_without_log_neither_package_is_imported(tmp_path):
    tiny = ["--set", "teacher.train.epochs=1", "--set", "teacher.model_args.hidden=[32]", "--set", "prune.steps=1",
            "--set", "distill.train.epochs=1", "--set", "prune.final_epochs=0", "--set", "export.enabled=false",
            "--set", "target.max_accuracy_drop=0.5", "--device", "cpu", "--threads", "1"]
    code = ("import sys\nfrom kdcli.cli import main\n"
            f"sys.argv = ['kdcli', 'compress', '--out', {str(tmp_path / 'run')!r}, *{tiny!r}]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'mlflow')"
            " or m == 'torch.utils.tensorboard'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run" / "student.kdc").is_file()


@pytest.mark.parametrize("value", ["tensorboard", "tensorboard:", "mlflow:", "wandb", "TensorBoard:tb", "mlflow:  "])
def test_a_bad_log_value_is_exit_2_naming_the_flag_and_the_forms(tmp_path, value):
    res = invoke("compress", "--out", tmp_path / "run", "--log", value)
    assert res.exit_code == 2
    assert res.output.strip() == f"error: --log {value!r}: expected {LOG_FORMS}"
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


@pytest.mark.parametrize("value,module", [("tensorboard:tb", "torch.utils.tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_package_is_exit_2_with_the_install_hint(tmp_path, monkeypatch, value, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import` now fails as if it were not installed
    res = invoke("compress", "--out", tmp_path / "run", "--log", value)
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert "pip install 'kdcli[tracking]'" in res.output and f"--log {value}" in res.output


def test_parse_log_forms():
    assert (parse_log("tensorboard:runs/tb").kind, parse_log("tensorboard:runs/tb").where) == ("tensorboard", "runs/tb")
    assert parse_log("mlflow").where is None
    assert parse_log("mlflow:http://localhost:5000").where == "http://localhost:5000"
    assert open_tracker([]) is None
    with pytest.raises(InputError, match="--log 'x'"):
        open_tracker(["x"])


@pytest.mark.skipif(not HAVE_MLFLOW or importlib.util.find_spec("sqlalchemy") is not None,
                    reason="needs mlflow-skinny without SQLAlchemy")
def test_a_database_store_without_full_mlflow_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(InputError, match=r"is a database, which needs the full MLflow package \(pip install mlflow\)"):
        open_tracker(["mlflow"])


# ----------------------------------------------------------------------------- what is sent


class Recorder:
    """A sink that keeps what it is sent; ``fail`` makes every call after start raise."""

    target = "recorder"

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def start(self, info):
        self.calls.append(("start", info))

    def __getattr__(self, name):
        def record(*args):
            if self.fail:
                raise ConnectionError("server gone\ntraceback...")
            self.calls.append((name, *args))
        return record


def test_steps_lambda_and_epoch_phases_are_named_and_a_failing_sink_is_dropped(tmp_path):
    from kdcli.console import Reporter

    recipe = load_recipe(builtin_recipe_path("quickstart"))
    good, bad = Recorder(), Recorder(fail=True)
    tracker = Tracker([good, bad])
    warnings = []

    class Warned(Reporter):
        def warn(self, message):
            warnings.append(message)

    records = [{"step": 1, "attempt": 1, "train_history": [{}, {}]}]  # a resumed run: epochs go on from 2
    tracker.start(recipe, tmp_path, records=records, reporter=Warned(quiet=True))
    info = good.calls[0][1]
    assert info.resumed and info.params["prune.steps"] == "3" and info.name == tmp_path.name
    reporter = tracker.wrap(Warned(quiet=True))
    reporter.metrics("step 2", {"epoch": 1, "epochs": 1, "train_loss": 0.5, "val_accuracy": 0.9})
    reporter.metrics("teacher", {"epoch": 1, "epochs": 3, "train_loss": 1.5})
    reporter.metrics("teacher 2", {"epoch": 1, "epochs": 1, "train_loss": 0.7, "val_loss": float("nan")})
    lam = {"matrix": [[0.25, 1.0], [0.75, 0.0]], "teacher_layers": ["layer1", "layer2"],
           "student_layers": ["features.1", "features[3]"], "learned": True}
    tracker.step({"step": 2, "attempt": 3, "tau": None, "macs_ratio": 0.5, "params_ratio": 0.4,
                  "val_accuracy": float("nan"), "accepted": False, "reason": "diverged"}, lam)
    scalars = [c[1:] for c in good.calls if c[0] == "scalars"]
    assert scalars[0] == ({"epoch/train_loss": 0.5, "epoch/val_accuracy": 0.9}, 3)
    assert scalars[1] == ({"teacher_train/train_loss": 1.5}, 1)
    assert scalars[2] == ({"teacher_finetune/train_loss": 0.7}, 1)  # NaN left out
    values, x = scalars[3]
    assert x == 3 and values["step/accepted"] == 0.0 and "step/tau" not in values and "step/val_accuracy" not in values
    assert values["lambda/layer1/features.1"] == 0.25 and values["lambda/layer2/features_3_"] == 0.0
    assert ("text", "step/reason", "step 2 (attempt 3, undone): diverged", 3) in good.calls
    # the failing sink was dropped at its first call, with one warning line, and never called again
    assert len(warnings) == 1 and "--log recorder: tracking stopped (ConnectionError: server gone)" in warnings[0]
    tracker.close("FINISHED")
    assert good.calls[-1] == ("close", "FINISHED") and [c[0] for c in bad.calls] == ["start"]
