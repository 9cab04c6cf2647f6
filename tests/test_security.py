"""A ``.kdc`` and a checkpoint are data: crafted files, tried as an attacker would, run no code.

Each crafted file would create a sentinel file if its code ran. Loading it through the library and
through ``kdcli analyze`` / ``kdcli export`` must refuse it with exit 2 and a line naming the file
and the code it wanted, and leave no sentinel; only ``--trust-checkpoint``, or the user naming the
same model (``--model`` or a recipe), lets user code run.
"""

from __future__ import annotations

import os
import pickle
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdcli.models.file import FORMAT, load_model_file, save_model_file
from kdcli.cli import app
from kdcli.errors import CheckpointError
from kdcli.models import build_model

SHAPE = [1, 4, 4]
runner = CliRunner()


def _mlp(shape=SHAPE, classes=3):
    torch.manual_seed(0)
    return build_model("mlp", {"hidden": [8]}, input_shape=shape, num_classes=classes)


def _kdc(path: Path, **changes) -> Path:
    """A valid mlp model file, with top-level fields or ``model`` fields replaced by ``changes``."""
    save_model_file(path, _mlp(), name="mlp", args={"hidden": [8]}, input_shape=SHAPE, num_classes=3)
    obj = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if key in ("name", "args", "input_shape", "num_classes"):
            obj["model"][key] = value
        else:
            obj[key] = value
    torch.save(obj, path)
    return path


def _evil_module(folder: Path, sentinel: Path) -> Path:
    """``evil.py``: touches the sentinel when imported; its ``factory`` builds the same mlp."""
    path = folder / "evil.py"
    path.write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(sentinel)!r}).touch()

        def factory(input_shape, num_classes):
            from kdcli.models import build_model
            return build_model("mlp", {{"hidden": [8]}}, input_shape=input_shape, num_classes=num_classes)
    """))
    return path


def _cli(*args, cwd: Path | None = None):
    old = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


class _Reduce:
    """Unpickling this runs ``os.system``: the classic malicious pickle."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _crafted(tmp_path: Path, sentinel: Path) -> dict[str, Path]:
    """Model files whose loading would run code, by name."""
    d = tmp_path / "files"
    d.mkdir()
    _evil_module(d, sentinel)
    files = {
        "os-system": _kdc(d / "system.kdc", name="os:system", args={"command": f"touch {sentinel}"}),
        "builtins-exec": _kdc(d / "exec.kdc", name="builtins:exec",
                              args={"source": f"open({str(sentinel)!r}, 'w')"}),
        "relative-file": _kdc(d / "rel.kdc", name="evil.py:factory", args={}),
        "absolute-file": _kdc(d / "abs.kdc", name=f"{d / 'evil.py'}:factory", args={}),
        "ensemble-member": _kdc(d / "ens.kdc", name="kdcli.ensembles.build:averaged_ensemble",
                                args={"member": {"name": "os:system", "args": {"command": f"touch {sentinel}"}},
                                      "members": 1}),
        "nested-generalist": _kdc(d / "gen.kdc", name="kdcli.ensembles.build:specialist_ensemble",
                                  args={"generalist": {"name": "evil.py:factory", "args": {}}, "subsets": [[0, 1]]}),
        "other-kdcli-function": _kdc(d / "kdfn.kdc", name="kdcli.files:atomic_write_text",
                                     args={"path": str(sentinel), "text": "x"}),
    }
    reduce_kdc = d / "reduce.kdc"
    torch.save({"format": FORMAT, "format_version": 1, "model": _Reduce(sentinel)}, reduce_kdc)
    files["reduce-in-kdc"] = reduce_kdc
    plain = d / "plain.kdc"
    plain.write_bytes(pickle.dumps({"format": FORMAT, "x": _Reduce(sentinel)}))
    files["plain-pickle"] = plain
    return files


@pytest.fixture()
def crafted(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    return _crafted(tmp_path, sentinel), sentinel


CODE_NAMES = {"os-system": "os:system", "builtins-exec": "builtins:exec", "relative-file": "evil.py:factory",
              "absolute-file": "evil.py:factory", "ensemble-member": "os:system",
              "nested-generalist": "evil.py:factory", "other-kdcli-function": "kdcli.files:atomic_write_text"}


def test_library_refuses_every_crafted_file(crafted):
    files, sentinel = crafted
    for label, path in files.items():
        with pytest.raises(CheckpointError) as err:
            load_model_file(path)
        msg = str(err.value)
        assert msg.startswith(str(path)), (label, msg)
        if label in CODE_NAMES:
            assert CODE_NAMES[label] in msg and "--trust-checkpoint" in msg, (label, msg)
        assert not sentinel.exists(), label


@pytest.mark.parametrize("command", ["analyze", "export"])
def test_cli_refuses_every_crafted_file(crafted, tmp_path, command):
    files, sentinel = crafted
    for label, path in files.items():
        extra = ["--out", tmp_path / f"out-{label}"] if command == "export" else []
        res = _cli(command, path, *extra, cwd=tmp_path)
        lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert res.exit_code == 2, (label, res.output)
        assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in res.output, (label, res.output)
        assert not sentinel.exists(), label


def test_trust_flag_or_naming_the_model_lets_the_code_run(crafted, tmp_path):
    files, sentinel = crafted
    folder = files["relative-file"].parent
    res = _cli("analyze", files["relative-file"], "--trust-checkpoint", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert sentinel.exists()  # the user asked for it
    sentinel.unlink()
    # Naming the same model: --model relative to where the command runs.
    res = _cli("analyze", "files/rel.kdc", "--model", "files/evil.py:factory", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert sentinel.exists()
    sentinel.unlink()
    # ... but naming another model does not license the file's own code.
    res = _cli("analyze", files["os-system"], "--model", "evil.py:factory", cwd=folder)
    assert res.exit_code == 0 and "os:system" not in res.output  # built from --model, not from the file


def test_recipe_naming_the_model_allows_its_file(tmp_path):
    """A student of a user model file loads wherever the recipe is, with no flag; not a file the
    recipe does not name."""
    sentinel = tmp_path / "SENTINEL"
    proj = tmp_path / "proj"
    proj.mkdir()
    _evil_module(proj, sentinel)
    (proj / "recipe.yaml").write_text("teacher: {model: evil.py:factory}\n")
    # As compress writes it: the spec absolute in memory, stored relative to the .kdc's folder.
    run = proj / "runs" / "r"
    save_model_file(run / "student.kdc", _mlp([1, 8, 8], 10), name=f"{proj / 'evil.py'}:factory", args={},
                    input_shape=[1, 8, 8], num_classes=10)  # the recipe's data: digits
    stored = torch.load(run / "student.kdc", weights_only=True)["model"]["name"]
    assert stored == "../../evil.py:factory"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = _cli("analyze", run / "student.kdc", "--recipe", proj / "recipe.yaml", cwd=elsewhere)
    assert res.exit_code == 0, res.output
    sentinel.unlink()
    (proj / "other.yaml").write_text("teacher: {model: mlp}\n")
    res = _cli("analyze", run / "student.kdc", "--recipe", proj / "other.yaml", cwd=elsewhere)
    assert res.exit_code == 2 and "evil.py:factory" in res.output and not sentinel.exists()


def test_model_file_and_its_code_move_together(tmp_path):
    """A relative ``file.py`` spec resolves against the .kdc's folder, not the working directory."""
    sentinel = tmp_path / "SENTINEL"
    a = tmp_path / "a"
    a.mkdir()
    _evil_module(a, sentinel)
    save_model_file(a / "m.kdc", _mlp(), name=f"{a / 'evil.py'}:factory", args={}, input_shape=SHAPE, num_classes=3)
    b = tmp_path / "moved"
    a.rename(b)
    model, info = load_model_file(b / "m.kdc", trust=True)
    assert info["model"]["name"] == f"{(b / 'evil.py').resolve()}:factory"
    x = torch.randn(2, *SHAPE)
    assert torch.equal(model(x), _mlp().eval()(x))


def test_yaml_tags_in_a_recipe_run_nothing(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"seed: !!python/object/apply:os.system ['touch {sentinel}']\nteacher: {{model: mlp}}\n")
    res = _cli("recipe", "validate", recipe)
    assert res.exit_code == 2 and str(recipe) in res.output and not sentinel.exists()


@pytest.mark.parametrize("label, changes, expected", [
    ("negative shape", {"input_shape": [1, -4, 4]}, "model.input_shape"),
    ("zero shape", {"input_shape": [0, 4, 4]}, "model.input_shape"),
    ("huge shape", {"input_shape": [3, 100000, 100000]}, "model.input_shape"),
    ("shape as text", {"input_shape": "1,4,4"}, "model.input_shape"),
    ("no classes", {"num_classes": 0}, "model.num_classes"),
    ("name not text", {"name": ["mlp"]}, "model.name"),
    ("args not a mapping", {"args": [8]}, "model.args"),
    ("version", {"format_version": 99}, "format version 99"),
    ("history not a list", {"pruning_history": "x"}, "pruning_history"),
    ("history index out of range", {"pruning_history": [["features.1", True, [999999]]]}, "index 999999 is out of range"),
    ("history negative index", {"pruning_history": [["features.1", True, [-1]]]}, "index -1 is out of range"),
    ("history repeats", {"pruning_history": [["features.1", True, [1, 1]]]}, "indices repeat"),
    ("history removes all", {"pruning_history": [["features.1", True, list(range(8))]]}, "every channel"),
    ("history unknown module", {"pruning_history": [["nope", True, [0]]]}, "no module 'nope'"),
    ("history malformed", {"pruning_history": [["features.1", True]]}, "pruning history entry 0"),
    ("state dict missing", {"state_dict": None}, "state_dict"),
    ("metadata not a mapping", {"metadata": [1]}, "metadata"),
])
def test_malformed_contents_are_named(tmp_path, label, changes, expected):
    path = _kdc(tmp_path / "m.kdc", **changes)
    with pytest.raises(CheckpointError) as err:
        load_model_file(path)
    assert str(err.value).startswith(str(path)) and expected in str(err.value), (label, str(err.value))


def test_history_indices_in_range_still_replay(tmp_path):
    from kdcli.prune.pruner import StructuredPruner

    model = _mlp()
    pruner = StructuredPruner(model, torch.zeros(1, *SHAPE))
    pruner.prune_ratios({next(iter(pruner.groups)): 0.5}, pruner.score())
    save_model_file(tmp_path / "p.kdc", model, name="mlp", args={"hidden": [8]}, input_shape=SHAPE, num_classes=3,
                    pruning_history=pruner.history())
    loaded, _ = load_model_file(tmp_path / "p.kdc")
    x = torch.randn(3, *SHAPE)
    assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_with_the_key(tmp_path, value):
    model = _mlp()
    sd = model.state_dict()
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key][0] = value
    kdc = _kdc(tmp_path / "m.kdc", state_dict=sd)
    with pytest.raises(CheckpointError, match=f"{key} holds NaN or infinite"):
        load_model_file(kdc)
    plain = tmp_path / "plain.pt"
    torch.save(sd, plain)
    res = _cli("analyze", plain, "--model", "mlp", "--model-args", '{"hidden": [8]}', "--input-shape", "1,4,4",
               "--num-classes", "3")
    assert res.exit_code == 2 and str(plain) in res.output and key in res.output
