"""Fuzzing the recipe validator: any input gets exit 0 or 2 and, on 2, one ``error:`` line that
names the file or the ``--set``; never a traceback or exit 1 ("error: unexpected ...").

The inputs are the shipped recipes mutated (keys deleted, values replaced by random YAML, unknown
and duplicate keys, random bytes, truncation) and random ``--set`` arguments, through
``kdcli recipe validate`` as a user runs it, and random text through :func:`parse_recipe`.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.errors import RecipeError
from kdcli.config.recipe import Recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {p.name: p.read_text() for p in sorted((REPO / "recipes").glob("*.yaml"))}
runner = CliRunner()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values a recipe might hold, plus the edges: huge and tiny numbers, inf, nan, names that are
# not models, file specs that do not exist, strings YAML reads as something else.
EDGE = ["1e400", ".inf", "-.inf", ".nan", "~", "", "auto", "none", "mlp", "resnet7", "x.py:f", "pkg.mod:f",
        ":", "a:b:c", "digits", "idx", "kd", "cuda:99999999999", "2001-13-45", "0x1F", "1_000", "yes",
        "!!python/object/apply:os.system ['true']", "&a [*a]", "{a: 1, a: 2}", "[[[[", "\x00", "é\n\t"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(-2**80, 2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(EDGE),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
keys = st.one_of(st.sampled_from(["seed", "model", "kind", "epochs", "lr", "steps", "source", "from",
                                  "ensemble", "losses", "macs", "zzz", "1", "a.b"]), st.text(max_size=8))


def _paths(obj, prefix=()):
    """Every key path of a parsed recipe (list items as ints)."""
    out = [prefix] if prefix else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out += _paths(v, prefix + (k,))
    return out


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


@st.composite
def mutated_recipe(draw) -> bytes:
    """A shipped recipe after a few structural edits, then maybe a text-level one."""
    text = SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))]
    obj = yaml.safe_load(text)
    for _ in range(draw(st.integers(0, 3))):
        paths = _paths(obj)
        path = draw(st.sampled_from(paths))
        parent = _get(obj, path[:-1])
        op = draw(st.sampled_from(["delete", "replace", "insert"]))
        if op == "delete":
            del parent[path[-1]]
        elif op == "replace":
            parent[path[-1]] = draw(values)
        elif isinstance(target := _get(obj, path), dict):
            target[draw(keys)] = draw(values)
        else:
            obj[draw(keys)] = draw(values)
    out = yaml.safe_dump(obj, allow_unicode=True, sort_keys=False)
    edit = draw(st.sampled_from(["none", "none", "duplicate", "truncate", "bytes", "text"]))
    lines = out.splitlines(keepends=True)
    if edit == "duplicate" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        lines.insert(i, lines[i])  # the same key twice in one mapping (or a repeated list item)
        out = "".join(lines)
    elif edit == "truncate":
        out = out[:draw(st.integers(0, len(out)))]
    elif edit == "text":
        i = draw(st.integers(0, len(out)))
        out = out[:i] + draw(st.text(max_size=12)) + out[i:]
    data = out.encode("utf-8", "surrogatepass")
    if edit == "bytes":
        i = draw(st.integers(0, len(data)))
        data = data[:i] + draw(st.binary(min_size=1, max_size=12)) + data[i:]
    return data


set_keys = st.one_of(
    st.sampled_from(sorted({".".join(map(str, p)) for t in SHIPPED.values() for p in _paths(yaml.safe_load(t))}
                           | {"seed", "device", "zzz", "teacher.zzz.x", "data.source.kind", "a..b", ""})),
    st.text(max_size=10),
)
set_values = st.one_of(st.text(max_size=16), st.sampled_from(EDGE),
                       values.map(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6)
                                  .removesuffix("\n...\n").strip()))
set_args = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", set_keys, set_values), st.text(max_size=10)),
                    max_size=3)


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _check(res, path: Path, sets: list[str]) -> None:
    why = f"exit {res.exit_code}, output {res.output!r}, exception {res.exception!r}, sets {sets!r}"
    assert res.exit_code in (0, 2), why
    lines = res.output.splitlines()
    if res.exit_code == 0:
        assert lines == [f"{path}: valid"], why
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), why
        assert lines[0].startswith((f"error: {path}:", f"error: {path}: ", "error: --set ")), why
        assert not lines[0].startswith("error: unexpected ") and "Traceback" not in res.output, why


@FUZZ
@given(data=mutated_recipe(), sets=set_args)
def test_validate_mutated_recipes(folder, data, sets):
    path = folder / "fuzz.yaml"
    path.write_bytes(data)
    args = ["recipe", "validate", str(path)]
    for s in sets:
        args += ["--set", s]
    _check(runner.invoke(app, args), path, sets)


@FUZZ
@given(sets=st.lists(st.builds(lambda k, v: f"{k}={v}", set_keys, set_values), min_size=1, max_size=4))
def test_validate_random_sets_on_shipped_recipes(sets):
    path = REPO / "recipes" / "quickstart.yaml"
    args = ["recipe", "validate", str(path)]
    for s in sets:
        args += ["--set", s]
    _check(runner.invoke(app, args), path, sets)


def _parse_or_explain(text: str, sets=()) -> None:
    try:
        r = parse_recipe(text, "fuzz.yaml", overrides=sets)
    except RecipeError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith(("fuzz.yaml:", "fuzz.yaml: ", "--set ")), msg
        return
    assert isinstance(r, Recipe)
    # what validates is finite everywhere
    for v in _leaves(r.model_dump()):
        assert not (isinstance(v, float) and not math.isfinite(v)), v


def _leaves(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ("model_args", "args"):  # the user's own keyword arguments, passed through
                yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


@FUZZ
@given(data=mutated_recipe())
def test_parse_recipe_mutated(data):
    _parse_or_explain(data.decode("utf-8", "replace"))


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.builds(lambda v: yaml.safe_dump(v), values)),
       sets=st.lists(st.builds(lambda k, v: f"{k}={v}", set_keys, set_values), max_size=2))
def test_parse_recipe_random_text(text, sets):
    _parse_or_explain(text, sets)


# ----------------------------------------------------------------------------- model files

import torch  # noqa: E402 - the loader fuzzing below is its own section

from kdcli.models.file import load_model_file, read_state_dict, save_model_file  # noqa: E402
from kdcli.errors import InputError  # noqa: E402

_KDC_FIELDS = ["format", "format_version", "model", "model.name", "model.args", "model.input_shape",
               "model.num_classes", "pruning_history", "state_dict", "metadata"]
_junk = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(),
                               st.text(max_size=12)),
                     lambda inner: st.one_of(st.lists(inner, max_size=4),
                                             st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                     max_leaves=8)


@pytest.fixture(scope="module")
def kdc_blob(tmp_path_factory):
    from kdcli.models import build_model
    from kdcli.prune.pruner import StructuredPruner

    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [8]}, input_shape=(1, 4, 4), num_classes=3)
    pruner = StructuredPruner(model, torch.zeros(1, 1, 4, 4))
    pruner.prune_ratios({pruner.groups[0]: 0.5}, pruner.score())
    path = tmp_path_factory.mktemp("kdc") / "m.kdc"
    save_model_file(path, model, name="mlp", args={"hidden": [8]}, input_shape=[1, 4, 4], num_classes=3,
                    pruning_history=pruner.history())
    return torch.load(path, weights_only=True), path.read_bytes()


def _must_load_or_refuse(path):
    """A model file loads, or is refused with an InputError naming it: nothing else escapes."""
    try:
        load_model_file(path)
    except InputError as exc:
        assert str(exc).startswith(str(path)), str(exc)
        assert "\n" not in str(exc)


@FUZZ
@given(field=st.sampled_from(_KDC_FIELDS), value=_junk)
def test_model_file_with_a_field_replaced(kdc_blob, tmp_path_factory, field, value):
    obj = {k: (dict(v) if isinstance(v, dict) else v) for k, v in kdc_blob[0].items()}
    top, _, sub = field.partition(".")
    if sub:
        obj[top] = {**obj[top], sub: value}
    else:
        obj[top] = value
    path = tmp_path_factory.mktemp("f") / "m.kdc"
    torch.save(obj, path)
    _must_load_or_refuse(path)


@FUZZ
@given(data=st.data())
def test_model_file_history_mutated(kdc_blob, tmp_path_factory, data):
    obj = dict(kdc_blob[0])
    history = [list(e) for e in obj["pruning_history"]]
    i = data.draw(st.integers(0, len(history) - 1))
    j = data.draw(st.integers(0, 2))
    history[i][j] = data.draw(st.one_of(_junk, st.lists(st.integers(-5, 10**7), max_size=6),
                                        st.sampled_from(["features", "", "features.1.weight", "classifier"])))
    obj["pruning_history"] = history
    path = tmp_path_factory.mktemp("h") / "m.kdc"
    torch.save(obj, path)
    _must_load_or_refuse(path)


@FUZZ
@given(data=st.data())
def test_model_file_bytes_corrupted(kdc_blob, tmp_path_factory, data):
    raw = bytearray(kdc_blob[1])
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path_factory.mktemp("b") / "m.kdc"
    path.write_bytes(bytes(raw))
    _must_load_or_refuse(path)
    plain = path.with_suffix(".pt")
    plain.write_bytes(bytes(raw))
    try:
        read_state_dict(plain)
    except InputError as exc:
        assert str(exc).startswith(str(plain))
