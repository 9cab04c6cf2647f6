"""The three report files — export/report.json, analysis.json, compress_report.json — and their
typed models: each file starts with its ``$schema``, validates against its own JSON Schema (checked
here by a small validator independent of pydantic, and by the model round trip), a report of the
wrong shape is refused before anything is written with a message naming the field, and the readers
(``load_any``, ``python -m kdcli.reports.models``, ``prune.ratios_from``) accept the files."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from torch import nn

from kdcli.analyze.analysis import analyze
from kdcli.config.recipe import AnalyzeSpec
from kdcli.data.loader import DataBundle, TensorData
from kdcli.dkdp.compress import CompressResult
from kdcli.errors import InputError
from kdcli.export.onnx import export_report
from kdcli.models import build_model
from kdcli.models.file import ModelInfo
from kdcli.reports.analysis import write_outputs
from kdcli.reports.analysis_model import AnalysisReport, load_analysis
from kdcli.reports.base import ReportShapeError
from kdcli.reports.compress import write_compress_report
from kdcli.reports.compress_model import CompressReport, load_compress_report
from kdcli.reports.models import REPORT_KINDS, ExportReport, load_any, load_report, main, report_json_schema

URIS = {"export-report": "urn:kdcli:schema:export-report:1", "analysis": "urn:kdcli:schema:analysis:1",
        "compress-report": "urn:kdcli:schema:compress-report:1"}
MODELS = {"export-report": ExportReport, "analysis": AnalysisReport, "compress-report": CompressReport}


# ----------------------------------------------------------------------------- a JSON Schema check


def schema_errors(schema: dict, value, path: str = "", root: dict | None = None) -> list[str]:
    """Where ``value`` breaks ``schema``: the subset of JSON Schema 2020-12 pydantic writes for these
    models ($ref, anyOf, const, enum, type, properties, required, additionalProperties,
    patternProperties, propertyNames, items). Fails on any other validating keyword, so that a
    schema using one cannot pass unchecked."""
    root = root or schema
    if "$ref" in schema:
        return schema_errors(root["$defs"][schema["$ref"].rsplit("/", 1)[1]], value, path, root)
    known = {"anyOf", "const", "enum", "type", "properties", "required", "additionalProperties", "patternProperties",
             "propertyNames", "items", "title", "description", "default", "$id", "$schema", "$defs"}
    assert set(schema) <= known, f"{path}: unchecked keywords {set(schema) - known}"
    where = path or "(top level)"
    if "anyOf" in schema:
        branches = [schema_errors(s, value, path, root) for s in schema["anyOf"]]
        if all(branches):  # name the errors of the branch of the value's type (the model, not null)
            deeper = [b for b in branches if not any(e.startswith(f"{where}: expected") for e in b)]
            return deeper[0] if deeper else [f"{where}: matches none of anyOf"]
    if "const" in schema and value != schema["const"]:
        return [f"{where}: expected {schema['const']!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not in {schema['enum']}"]
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    t = schema.get("type")
    if t in ("integer", "number"):
        ok = not isinstance(value, bool) and isinstance(value, int if t == "integer" else (int, float))
    else:
        ok = t is None or isinstance(value, kinds[t])
    if not ok:
        return [f"{where}: expected {t}, got {type(value).__name__}"]
    errors = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{path}.{k}: required" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            sub = f"{path}.{k}" if path else k
            if "propertyNames" in schema:
                errors += schema_errors(schema["propertyNames"], k, f"{sub} (key)", root)
            if k in props:
                errors += schema_errors(props[k], v, sub, root)
                continue
            pattern = next((s for p, s in schema.get("patternProperties", {}).items() if re.search(p, k)), None)
            extra = pattern if pattern is not None else schema.get("additionalProperties", True)
            if extra is False:
                errors.append(f"{sub}: not allowed")
            elif isinstance(extra, dict):
                errors += schema_errors(extra, v, sub, root)
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += schema_errors(schema["items"], v, f"{path}[{i}]", root)
    return errors


def _same(a, b) -> bool:
    return json.dumps(a) == json.dumps(b)  # NaN-aware, order-sensitive


# ----------------------------------------------------------------------------- the three files


class Net(nn.Module):
    """conv BN ReLU, conv BN ReLU, pool, linear: two prunable groups and tapped layers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.relu1, self.relu2, self.pool, self.fc = nn.ReLU(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(6, 3)

    def forward(self, x):
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.fc(self.pool(x).flatten(1))


def _data() -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 6, 6, generator=g)
    part = TensorData(x, torch.randint(0, 3, (48,), generator=g))
    return DataBundle(part, part, None, 3, (1, 6, 6), [0.0], [1.0], ["a", "b", "c"], "synthetic", eval_batch_size=16)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A full analysis (data, scan, tapped layers, clusters) written to a folder: (folder, result)."""
    out = tmp_path_factory.mktemp("analysis")
    torch.manual_seed(0)
    settings = AnalyzeSpec(ratios=[0.0, 0.5], eval_samples=48, critical_fraction=0.25)
    result = analyze(Net().eval(), ModelInfo("net", {}, (1, 6, 6), 3), _data(), settings=settings, clusters=2,
                     out_dir=out)
    return out, result


@pytest.fixture(scope="module")
def export_json(tmp_path_factory) -> dict:
    """A real export report (tiny MLP teacher and student) as written to report.json."""
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    shape, info = (1, 4, 4), {"name": "mlp", "input_shape": [1, 4, 4], "num_classes": 3, "mean": [0.0], "std": [1.0],
                              "class_names": ["a", "b", "c"]}
    teacher, student = (build_model("mlp", {"hidden": h}, input_shape=shape, num_classes=3).eval() for h in ([16], [4]))
    x = torch.randn(16, *shape)
    export_report(student, info, out, teacher=teacher, teacher_info=info, x_eval=x, y_eval=teacher(x).argmax(1),
                  batch_sizes=(1,), time_budget_s=0.02)
    return json.loads((out / "report.json").read_text())


TEACHER = {"model": "mlp", "macs": 1000, "params": 900, "val_accuracy": 0.9, "test_accuracy": 0.88}
STUDENT = {"model": "mlp", "file": "student.kdc", "from": "steps/step_001.kdc", "macs": 400, "params": 380,
           "val_accuracy": 0.89, "macs_ratio": 0.4, "params_ratio": 380 / 900, "test_accuracy": 0.87}
EPOCH = {"epoch": 1, "epochs": 1, "train_loss": 0.5, "train_accuracy": 0.8, "lr": 0.01, "epoch_seconds": 0.2,
         "val_accuracy": 0.89, "val_loss": 0.4}
STEP = {"step": 1, "attempt": 1, "tau": 0.5, "aggressiveness": 1.0, "target_macs": 500.0, "macs": 400, "params": 380,
        "macs_ratio": 0.4, "params_ratio": 380 / 900, "val_accuracy": 0.89, "accuracy_drop": 0.01, "accepted": True,
        "reason": "accuracy held", "seconds": 1.5, "latency_ms": None, "train_history": [EPOCH],
        "teacher_val_accuracy": None}
DIVERGED = {**STEP, "attempt": 2, "val_accuracy": math.nan, "accuracy_drop": math.nan, "accepted": False,
            "reason": "diverged: undone", "train_history": []}
LAMBDA = {"matrix": [[0.25], [0.75]], "teacher_layers": ["t1", "t2"], "student_layers": ["s1"], "learned": True}


def _compress_result(run_dir, **kw) -> CompressResult:
    args = dict(run_dir=run_dir, teacher=dict(TEACHER), student=dict(STUDENT), steps=[copy.deepcopy(STEP), dict(DIVERGED)],
                target_met=True, gate_failures=[], vid_lambda=copy.deepcopy(LAMBDA))
    return CompressResult(**{**args, **kw})


@pytest.fixture(scope="module")
def files(analysed, export_json, tmp_path_factory) -> dict:
    """Report name → path of a file kdcli wrote (the compress report with an export)."""
    run = tmp_path_factory.mktemp("run")
    (run / "export").mkdir()
    (run / "export" / "report.json").write_text(json.dumps(export_json, indent=2))
    write_compress_report(_compress_result(run, export=copy.deepcopy(export_json)), run)
    return {"export-report": run / "export" / "report.json", "analysis": analysed[0] / "analysis.json",
            "compress-report": run / "compress_report.json"}


@pytest.mark.parametrize("name", list(URIS))
def test_each_file_starts_with_its_schema_and_keeps_its_version(files, name):
    text = files[name].read_text()
    assert text.startswith('{\n  "$schema": "' + URIS[name] + '",\n')
    raw = json.loads(text)
    assert list(raw)[0] == "$schema" and raw["$schema"] == report_json_schema(name)["$id"] == MODELS[name].uri
    assert raw["version" if name == "export-report" else "schema_version"] == 1


@pytest.mark.parametrize("name", list(URIS))
def test_each_file_validates_against_its_own_json_schema(files, name):
    raw, schema = json.loads(files[name].read_text()), report_json_schema(name)
    assert schema_errors(schema, raw) == []
    assert list(raw) == list(schema["properties"])  # kdcli writes every field, in the schema's order
    assert all(d.get("additionalProperties") is False for d in [schema, *schema["$defs"].values()])
    # the model round trip gives the file back exactly
    report = load_any(files[name])
    assert isinstance(report, MODELS[name]) and _same(report.to_json() if name != "export-report" else
                                                      report.model_dump(mode="json", by_alias=True), raw)


@pytest.mark.parametrize("name,edit,where", [
    ("analysis", lambda r: r["layers"][0].update(macs="12"), "layers[0].macs: expected integer"),
    ("analysis", lambda r: r["groups"][0]["importance"].update(gain=[1.0]), "groups[0].importance.gain (key)"),
    ("analysis", lambda r: r.update(extra=1), "extra: not allowed"),
    ("compress-report", lambda r: r["steps"][1].pop("reason"), "steps[1].reason: required"),
    ("compress-report", lambda r: r["export"]["ratios"].update(size="small"), "export.ratios.size: expected number"),
    ("export-report", lambda r: r["latency"]["onnxruntime"]["CPUExecutionProvider"]["student"].update(x={}),
     "latency.onnxruntime.CPUExecutionProvider.student.x"),
])
def test_the_json_schema_check_can_fail(files, name, edit, where):
    """The check above is not vacuous: a file with one wrong field breaks its schema there."""
    raw = json.loads(files[name].read_text())
    edit(raw)
    assert any(e.startswith(where) for e in schema_errors(report_json_schema(name), raw)), \
        schema_errors(report_json_schema(name), raw)


def test_the_step_model_has_every_field_of_the_step_record():
    """A field added to the DKDP step record needs its place in the compress report's model (and
    there a type and a description): this fails at once, not at the end of a compress run."""
    import dataclasses

    from kdcli.dkdp.run import StepRecord
    from kdcli.reports.compress_model import Step

    assert [f.name for f in dataclasses.fields(StepRecord)] == [f.alias or n for n, f in Step.model_fields.items()]


# ----------------------------------------------------------------------------- wrong shapes


@pytest.mark.parametrize("edit,field", [
    (lambda r: r["layers"][1].pop("macs_share"), r"layers\[1\]\.macs_share: Field required"),
    (lambda r: r["groups"][0].update(channels="4"), r"groups\[0\]\.channels: Input should be a valid integer"),
    (lambda r: r["suggested_ratios"].update(reached="yes"), r"suggested_ratios\.reached: Input should be a valid boolean"),
    (lambda r: r.update(timings={"warmup": 1.0}), r"timings\.warmup \(key\): Input should be"),
    (lambda r: r.update(speed=1), r"speed: Extra inputs are not permitted"),
])
def test_analysis_of_a_wrong_shape_is_refused_before_anything_is_written(analysed, tmp_path, edit, field):
    bad = copy.deepcopy(analysed[1])
    edit(bad)
    with pytest.raises(ReportShapeError, match=r"^analysis\.json does not match its schema \(AnalysisReport\): " + field):
        write_outputs(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit,field", [
    (lambda r: r.steps[0].update(reason=None), r"steps\[0\]\.reason: Input should be a valid string"),
    (lambda r: r.steps[0].update(pruned_channels=3), r"steps\[0\]\.pruned_channels: Extra inputs are not permitted"),
    (lambda r: r.teacher.pop("macs"), r"teacher\.macs: Field required"),
    (lambda r: r.export["ratios"].update(size="small"), r"export\.ratios\.size: Input should be a valid number"),
    (lambda r: setattr(r, "vid_lambda", {"matrix": [[1.0]]}), r"vid_lambda\.teacher_layers: Field required"),
])
def test_compress_report_of_a_wrong_shape_is_refused_before_anything_is_written(export_json, tmp_path, edit, field):
    res = _compress_result(tmp_path, export=copy.deepcopy(export_json))
    edit(res)
    with pytest.raises(ReportShapeError, match=r"^compress_report\.json does not match its schema \(CompressReport\): "
                                               + field):
        write_compress_report(res, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,edit,why", [
    ("analysis", lambda r: r["model"].update(macs=1.5), r"model\.macs: Input should be a valid integer"),
    ("analysis", lambda r: r.update(schema_version=2), r"another version .*reads urn:kdcli:schema:analysis:1"),
    ("compress-report", lambda r: r["steps"][0].update(accepted="yes"), r"steps\[0\]\.accepted: Input should be a valid boolean"),
    ("compress-report", lambda r: r.update({"$schema": "urn:kdcli:schema:compress-report:2"}), "another version"),
])
def test_a_malformed_file_is_refused_naming_file_and_field(files, tmp_path, name, edit, why):
    raw = json.loads(files[name].read_text())
    edit(raw)
    path = tmp_path / files[name].name
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=re.escape(str(path)) + ": .*" + why):
        load_any(path)


def test_a_file_of_another_kind_is_refused_by_a_reader_of_one_kind(files):
    with pytest.raises(InputError, match=r"\$schema 'urn:kdcli:schema:analysis:1' is another kind of file, not a "
                                         r"kdcli export report"):
        load_report(files["analysis"])
    with pytest.raises(InputError, match="not a kdcli compress report"):
        load_compress_report(files["export-report"])


# ----------------------------------------------------------------------------- readers


def test_readers_accept_the_files(files, analysed):
    from kdcli.dkdp.compress import _suggested_ratios  # what prune.ratios_from reads

    analysis = json.loads(files["analysis"].read_text())
    assert analysis["suggested_ratios"]["ratios"]  # something to read
    assert _suggested_ratios(files["analysis"]) == analysis["suggested_ratios"]["ratios"]
    assert load_analysis(files["analysis"]).suggested_ratios.ratios == analysis["suggested_ratios"]["ratios"]
    report = load_compress_report(files["compress-report"])
    assert report.export == load_report(files["export-report"]) and report.student.from_ == STUDENT["from"]
    assert math.isnan(report.steps[1].val_accuracy) and report.vid_lambda.matrix == LAMBDA["matrix"]
    assert json.loads(files["compress-report"].read_text())["teacher"] == TEACHER  # as the result had it
    # the in-memory result is what was written (plus nothing): the renderers read the same figures
    assert _same(analysed[1], analysis)


def test_files_written_before_schema_still_read(files, tmp_path):
    for name, path in files.items():
        raw = json.loads(path.read_text())
        del raw["$schema"]
        old = tmp_path / path.name
        old.write_text(json.dumps(raw))
        report = load_any(old)  # the kind found from its shape, read as version 1
        assert isinstance(report, MODELS[name]) and report.schema_uri == URIS[name]


def test_command_line_validates_every_kind_and_prints_each_schema(files, capsys):
    assert main([str(p) for p in files.values()]) == 0
    out = capsys.readouterr().out
    assert all(f"{p}: ok ({URIS[n]})" in out for n, p in files.items())
    for name in REPORT_KINDS:
        assert main(["--schema", name]) == 0
        assert json.loads(capsys.readouterr().out) == report_json_schema(name) == MODELS[name].model_json_schema(by_alias=True)
    assert main(["--schema"]) == 0 and json.loads(capsys.readouterr().out)["$id"] == URIS["export-report"]
    assert main(["--schema", "analysis.json"]) == 2 and "export-report, analysis, compress-report" in capsys.readouterr().err


def test_report_json_schema_names():
    assert set(REPORT_KINDS) == set(URIS)
    assert report_json_schema() == report_json_schema("export-report")
    for name, uri in URIS.items():
        schema = report_json_schema(name)
        assert schema["$id"] == uri and schema["properties"]["$schema"]["const"] == uri
        assert "$schema" not in schema["required"]  # files written before it was added still read
    with pytest.raises(InputError, match="unknown report 'report'"):
        report_json_schema("report")
