"""Recipe loading: errors that name file, line and field; ``--set`` overrides; shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcli.data import IdxSource
from kdcli.errors import RecipeError
from kdcli.recipe import apply_overrides, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]
MINIMAL = "teacher:\n  model: mlp\n"


@pytest.mark.parametrize("text, message", [
    # unknown key two levels down: its own line, its full path
    (MINIMAL + "prune:\n  steps: 2\n  stepz: 3\n", r"^r\.yaml:5: prune\.stepz: unknown key$"),
    (MINIMAL + "data:\n  batch_size: lots\n", r"^r\.yaml:4: data\.batch_size: Input should be a valid integer.*\(got 'lots'\)"),
    (MINIMAL + "prune:\n  steps: 0\n", r"^r\.yaml:4: prune\.steps: Input should be greater than or equal to 1 \(got 0\)"),
    ("teacher:\n  model: [mlp\n", r"^r\.yaml:3: not valid YAML"),
    ("- seed\n- data\n", r"^r\.yaml:1: a recipe must be a mapping .*got list"),
    ("seed: 1\n", r"^r\.yaml:1: teacher: required field missing"),
    (MINIMAL + "distill:\n  losses:\n    - {kind: kd, temperature: 4}\n    - {kind: kd, temperature: -1}\n",
     r"^r\.yaml:6: distill\.losses\[1\]\.temperature: Input should be greater than 0"),
    (MINIMAL + "data:\n  source: {kind: idx}\n", r"^r\.yaml:4: data\.source\.(idx\.)?path: required field missing"),
    (MINIMAL + "data:\n  source: mnist\n", r"^r\.yaml:4: data\.source: .*'mnist'.*'idx', 'cifar10-bin'"),
    (MINIMAL + "target: {macs: 1.5}\n", r"^r\.yaml:3: target: .*a fraction must be <= 1"),
    (MINIMAL + "device: gpu\n", r"^r\.yaml:3: device: .*auto, cpu, cuda or cuda:N"),
    (MINIMAL + "distill:\n  train_teacher: {epochs: 0}\n",
     r"^r\.yaml:4: distill\.train_teacher\.epochs: Input should be greater than or equal to 1"),
    ("teacher: {ensemble: diversified, model: mlp}\nstudent: {model: mlp}\ndistill:\n  train_teacher: {}\n",
     r"distill\.train_teacher: an ensemble teacher is not fine-tuned"),
])
def test_errors_name_file_line_and_field(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text, "r.yaml")


def test_load_recipe_errors_name_the_path(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(MINIMAL + "export:\n  opset: 11\n")
    with pytest.raises(RecipeError, match=rf"^{p}:4: export\.opset: Input should be greater than or equal to 18"):
        load_recipe(p)
    with pytest.raises(RecipeError, match=r"missing\.yaml: recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path)


def test_defaults_and_paths_relative_to_the_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "r.yaml"
    p.write_text(MINIMAL + "data:\n  source: {kind: idx, path: ../mnist}\n")
    r = load_recipe(p)
    assert r.base_dir == tmp_path / "sub" and r.resolve("../mnist") == tmp_path / "sub" / "../mnist"
    assert isinstance(r.data.source_spec, IdxSource) and r.data.val_fraction == 0.1
    assert r.student.from_ == "pruned-teacher" and r.student.prune is True
    assert [loss.kind for loss in r.distill.losses] and r.prune.steps == 4
    other = parse_recipe(MINIMAL + "student: {model: lenet5}\n")
    assert other.student.from_ is None and other.student.prune is False


def test_overrides_set_nested_values():
    obj = apply_overrides({"teacher": {"model": "mlp"}}, ["prune.steps=2", "teacher.model_args.hidden=[32, 16]",
                                                          "data.source=digits", "data.source.kind=idx"], "r.yaml")
    assert obj["prune"] == {"steps": 2} and obj["teacher"]["model_args"] == {"hidden": [32, 16]}
    assert obj["data"]["source"] == {"kind": "idx"}  # a bare source kind becomes a mapping to extend
    r = parse_recipe(MINIMAL, "r.yaml", overrides=["prune.steps=2", "target.macs=0.5", "seed=7"])
    assert (r.prune.steps, r.target.macs, r.seed) == (2, 0.5, 7)
    assert r.sha256 != parse_recipe(MINIMAL, "r.yaml").sha256  # overrides change the run's identity


def test_override_errors():
    with pytest.raises(RecipeError, match=r"--set 'prune\.steps': expected KEY\.PATH=VALUE"):
        parse_recipe(MINIMAL, "r.yaml", overrides=["prune.steps"])
    with pytest.raises(RecipeError, match=r"--set 'teacher\.model\.x=1': r\.yaml: teacher\.model is not a mapping"):
        parse_recipe(MINIMAL, "r.yaml", overrides=["teacher.model.x=1"])
    with pytest.raises(RecipeError, match=r"prune\.steps: Input should be greater than or equal to 1 \(got 0\)"):
        parse_recipe(MINIMAL, "r.yaml", overrides=["prune.steps=0"])


SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def test_at_least_four_shipped_recipes():
    assert len(SHIPPED) >= 4, [p.name for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    r = load_recipe(path)
    # a single teacher names its model; an ensemble teacher says which kind it is
    assert (getattr(r.teacher, "model", None) or r.teacher.ensemble) and r.path == path
