"""The recipe schema package (kdcli.config): torch-free, published as JSON Schema, and built
from registries, so that each kind (loss, data source, importance criterion) is defined once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdcli.cli import app

REPO = Path(__file__).resolve().parents[1]


def test_recipe_validate_imports_no_torch():
    """``kdcli recipe validate`` loads and validates a full recipe through the CLI without importing
    torch (or the other heavy runtime packages): what keeps it quick, checked by behaviour, not time."""
    recipe = REPO / "recipes" / "cifar10-resnet.yaml"
    code = ("import sys; from kdcli.cli import main\n"
            f"sys.argv = ['kdcli', 'recipe', 'validate', {str(recipe)!r}]\n"
            "try: main()\nexcept SystemExit as e: code = e.code or 0\nelse: code = 0\n"
            "heavy = sorted({k.split('.')[0] for k in sys.modules} & {'torch', 'torch_pruning', 'onnx', 'onnxruntime'})\n"
            "print('RESULT', code, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert f"{recipe}: valid" in out, out
    assert out.strip().splitlines()[-1] == "RESULT 0 []", out


def test_recipe_schema_describes_every_section_and_the_registries():
    res = CliRunner().invoke(app, ["recipe", "schema"])
    assert res.exit_code == 0
    schema = json.loads(res.stdout)
    assert schema["$schema"].endswith("2020-12/schema") and schema["$id"].startswith("urn:kdcli:schema:recipe:")
    assert set(schema["properties"]) == {"seed", "device", "out_dir", "data", "teacher", "student", "distill",
                                         "prune", "target", "export", "analyze"}
    text = json.dumps(schema)
    from kdcli.config.data import SOURCE_KINDS
    from kdcli.config.importance import NAMES
    from kdcli.config.losses import LOSS_KINDS

    for kind in (*LOSS_KINDS, *SOURCE_KINDS, *NAMES):
        assert f'"{kind}"' in text, kind
    assert schema["$defs"]["PruneSpec"]["additionalProperties"] is False  # unknown keys are errors


def _check(instance, schema, defs, where="recipe"):
    """A small JSON-Schema check (the subset pydantic emits) of a recipe against the schema, so
    the test needs no jsonschema package: types, enums, required and unknown keys."""
    if "$ref" in schema:
        return _check(instance, defs[schema["$ref"].split("/")[-1]], defs, where)
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf") or schema.get("oneOf")
        errors = []
        for option in options:
            try:
                return _check(instance, option, defs, where)
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{where}: matches none of {len(options)} options ({errors[:2]})")
    if "const" in schema:
        assert instance == schema["const"], where
    if "enum" in schema:
        assert instance in schema["enum"], (where, instance)
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
             "integer": int, "number": (int, float)}
    if kind:
        assert isinstance(instance, types[kind]), (where, instance, kind)
    if kind == "object":
        for key in schema.get("required", []):
            assert key in instance, (where, key)
        props = schema.get("properties", {})
        for key, value in instance.items():
            if key in props:
                _check(value, props[key], defs, f"{where}.{key}")
            else:
                assert schema.get("additionalProperties", True) is not False, (where, key)
    if kind == "array" and "items" in schema:
        for i, item in enumerate(instance):
            _check(item, schema["items"], defs, f"{where}[{i}]")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_fits_the_published_schema(name):
    from kdcli.config.recipe import recipe_json_schema

    schema = recipe_json_schema()
    recipe = yaml.safe_load((REPO / "recipes" / name).read_text())
    _check(recipe, schema, schema["$defs"])


def test_the_schema_check_can_fail():
    from kdcli.config.recipe import recipe_json_schema

    schema = recipe_json_schema()
    with pytest.raises(AssertionError):
        _check({"teacher": {"model": "mlp"}, "prune": {"stepz": 2}}, schema, schema["$defs"])
    with pytest.raises(AssertionError):
        _check({"teacher": {"model": "mlp"}, "distill": {"losses": [{"kind": "nope"}]}}, schema, schema["$defs"])


def test_every_loss_kind_has_one_term_and_every_source_a_reader():
    from kdcli.config.data import SOURCE_KINDS
    from kdcli.config.losses import LOSS_KINDS
    from kdcli.distill.losses import TERMS
    from kdcli.data.sources import READERS

    assert set(TERMS) == set(LOSS_KINDS)
    assert set(READERS) == set(SOURCE_KINDS)


def test_a_term_kind_cannot_be_implemented_twice():
    from kdcli.distill.losses.base import Term

    with pytest.raises(TypeError, match="implemented twice"):
        class Again(Term, kind="kd"):  # noqa: F841 - defining it is the test
            pass


def test_importance_criteria_come_from_one_table():
    from kdcli.config.importance import CRITERIA, NEEDS_DATA
    from kdcli.config.recipe import PruneSpec
    from kdcli.prune.importance import IMPORTANCES

    assert IMPORTANCES == tuple(CRITERIA) and NEEDS_DATA == {"taylor", "activation"}
    for name in CRITERIA:
        assert PruneSpec(importance=name).importance == name


def test_the_config_package_mixes_no_runtime_code():
    """Every module of kdcli.config imports without torch, numpy or the runtime packages."""
    code = ("import sys, pkgutil, importlib, kdcli.config as c\n"
            "for m in pkgutil.iter_modules(c.__path__): importlib.import_module('kdcli.config.' + m.name)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'numpy', 'torch_pruning', 'onnx')"
            " or k in ('kdcli.data.loader', 'kdcli.train.loop', 'kdcli.prune.pruner', 'kdcli.distill.losses')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
