"""Recipe loading: errors that name file, line and field; ``--set`` overrides; shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcli.config.data import IdxSource
from kdcli.errors import RecipeError
from kdcli.config.recipe import apply_overrides, load_recipe, parse_recipe

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
    # a section's validator names the key itself, not the section
    (MINIMAL + "target: {macs: 1.5}\n", r"^r\.yaml:3: target\.macs: a fraction must be <= 1.*\(got 1\.5\)$"),
    (MINIMAL + "distill:\n  losses:\n    - {kind: vid, lambda: learned}\n",
     r"^r\.yaml:5: distill\.losses\[0\]\.lambda: learned needs pairing: all-to-all"),
    ("teacher: {ensemble: diversified, model: mlp}\n", r"^r\.yaml:1: student\.model: an ensemble teacher cannot be pruned"),
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
    with pytest.raises(RecipeError, match=r"--set 'a\.\.b=1': expected KEY\.PATH=VALUE"):
        parse_recipe(MINIMAL, "r.yaml", overrides=["a..b=1"])
    with pytest.raises(RecipeError, match=r"^--set 'distill\.losses\.2\.weight=1': distill\.losses is a list of 2; "
                                          r"expected an index from 0 to 1 \(got '2'\)$"):
        parse_recipe(MINIMAL + "distill: {losses: [{kind: kd}, {kind: ce}]}\n", "r.yaml", overrides=["distill.losses.2.weight=1"])


def test_overrides_index_lists():
    text = MINIMAL + "distill: {losses: [{kind: kd, temperature: 4}, {kind: ce}]}\n"
    r = parse_recipe(text, "r.yaml", overrides=["distill.losses[0].temperature=2", "distill.losses.1.weight=0.5"])
    assert (r.distill.losses[0].temperature, r.distill.losses[1].weight) == (2, 0.5)
    with pytest.raises(RecipeError, match=r"^--set 'distill\.losses\[0\]\.temperature=0': distill\.losses\[0\]\.temperature: "
                                          r"Input should be greater than 0"):
        parse_recipe(text, "r.yaml", overrides=["distill.losses[0].temperature=0"])


@pytest.mark.parametrize("text, sets, message", [
    # the bad value came from --set: the message points at it, not at a line of the file
    (MINIMAL, ["prune.steps=0"], r"^--set 'prune\.steps=0': prune\.steps: Input should be greater than or equal to 1 \(got 0\)$"),
    (MINIMAL + "prune:\n  steps: 2\n", ["prune.steps=0"], r"^--set 'prune\.steps=0': prune\.steps: "),
    (MINIMAL, ["seed=1", "prune.stepz=3"], r"^--set 'prune\.stepz=3': prune\.stepz: unknown key$"),
    (MINIMAL, ["target={macs: 1.5}"], r"^--set 'target=\{macs: 1\.5\}': target\.macs: a fraction must be <= 1"),
    (MINIMAL, ["data.source.kind=idx"], r"^--set 'data\.source\.kind=idx': data\.source\.path: required field missing$"),
    (MINIMAL, ["teacher.model=resnet7"], r"^--set 'teacher\.model=resnet7': teacher\.model: unknown model 'resnet7'"),
    (MINIMAL, ["target.macs=.nan"], r"^--set 'target\.macs=\.nan': target\.macs: Input should be a finite number"),
    (MINIMAL, ["teacher.model_args={a: 1, a: 2}"], r"^--set 'teacher\.model_args=\{a: 1, a: 2\}': teacher\.model_args\.a: duplicate key$"),
    # an error of the file itself still names the file and line, whatever else --set changed
    (MINIMAL + "prune:\n  steps: 0\n", ["seed=3", "prune.importance=taylor"], r"^r\.yaml:4: prune\.steps: "),
    (MINIMAL + "data:\n  source: {kind: idx}\n", ["data.batch_size=8"], r"^r\.yaml:4: data\.source\.path: required"),
])
def test_set_errors_point_at_the_set(text, sets, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text, "r.yaml", overrides=sets)


def test_a_set_does_not_change_what_an_alias_shares():
    text = MINIMAL.replace("  model: mlp\n", "  model: mlp\n  train: &t {epochs: 4, lr: 0.1}\ndistill:\n  train: *t\n")
    r = parse_recipe(text, "r.yaml", overrides=["teacher.train.epochs=9"])
    assert (r.teacher.train.epochs, r.distill.train.epochs) == (9, 4)


@pytest.mark.parametrize("text, message", [
    (MINIMAL + "prune:\n  steps: 2\n  steps: 3\n", r"^r\.yaml:5: prune\.steps: duplicate key$"),
    (MINIMAL + "teacher:\n  model: cnn3\n", r"^r\.yaml:3: teacher: duplicate key$"),
    (MINIMAL + "distill:\n  losses:\n    - {kind: kd, kind: ce}\n", r"^r\.yaml:5: distill\.losses\[0\]\.kind: duplicate key$"),
    (MINIMAL + "1: a\n0x1: b\n", r"^r\.yaml:4: 1: duplicate key$"),  # the same key spelt twice
    # Python tags stay refused by safe loading, with the file and line
    (MINIMAL + "seed: !!python/object/apply:os.system ['echo hi']\n", r"^r\.yaml:3: not valid YAML \(could not determine a constructor .*python/object/apply:os\.system"),
    # a constructor's own exception (no such date, no such float) is a YAML error with a line
    (MINIMAL + "seed: 2001-13-45\n", r"^r\.yaml:3: not valid YAML \(cannot read timestamp '2001-13-45': month must be in 1\.\.12\)$"),
    (MINIMAL + "seed: !!float abc\n", r"^r\.yaml:3: not valid YAML \(cannot read float 'abc'"),
    ("a: &a [*a]\n", r"^r\.yaml:1: not valid YAML \(an alias inside the value it names\)$"),
    ("a: " + "[" * 5000, r"^r\.yaml: not valid YAML \(nested more than 64 levels deep\)$"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                                                       for p, c in zip("abcdefgh", "bcdefghi")),
     r"^r\.yaml:\d+: not valid YAML \(more than 100000 values once aliases are expanded\)$"),
    (MINIMAL + "seed: 1\x00\n", r"^r\.yaml:3: not valid YAML \(unacceptable character #x0000"),
    # a key that is not a plain name is quoted: a newline in it cannot split the message
    (MINIMAL + '"a\\nb": 1\n', r"^r\.yaml:3: 'a\\nb': unknown key$"),
])
def test_yaml_that_safe_load_would_accept_or_crash_on(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text, "r.yaml")


def test_yaml_merge_keys_still_work():
    text = "teacher:\n  model: mlp\n  train: &b {epochs: 3, lr: 0.1}\ndistill:\n  train: {<<: *b, epochs: 5}\n"
    r = parse_recipe(text, "r.yaml")
    assert (r.distill.train.epochs, r.distill.train.lr) == (5, 0.1)


@pytest.mark.parametrize("text, message", [
    (MINIMAL + "target: {macs: 1e400}\n", r"^r\.yaml:3: target\.macs: Input should be a finite number \(got '1e400'\)$"),
    (MINIMAL + "target: {macs: 1.0e+400}\n", r"^r\.yaml:3: target\.macs: Input should be a finite number \(got inf\)$"),
    (MINIMAL + "target: {params: 1.0e+30}\n", r"^r\.yaml:3: target\.params: Input should be less than or equal to 1000000000000000000 \(got 1e\+30\)$"),
    (MINIMAL + "distill:\n  losses: [{kind: kd, temperature: .inf}]\n", r"^r\.yaml:4: distill\.losses\[0\]\.temperature: Input should be a finite number"),
    (MINIMAL + "distill:\n  losses: [{kind: kd, temperature: 1.0e+5}]\n", r"^r\.yaml:4: distill\.losses\[0\]\.temperature: Input should be less than or equal to 1000 \(got 100000\.0\)$"),
    ("teacher:\n  model: mlp\n  train: {lr: .nan}\n", r"^r\.yaml:3: teacher\.train\.lr: Input should be a finite number \(got nan\)$"),
    (MINIMAL + "data:\n  normalize: {mean: [0.5], std: [.nan]}\n", r"^r\.yaml:4: data\.normalize\.std\[0\]: Input should be a finite number"),
    (MINIMAL + "analyze: {ratios: [0.1, -.inf]}\n", r"^r\.yaml:3: analyze\.ratios\[1\]: Input should be a finite number"),
    (MINIMAL + "seed: 99999999999999999999\n", r"^r\.yaml:3: seed: Input should be less than or equal to 4294967295"),
    (MINIMAL + "seed: -1\n", r"^r\.yaml:3: seed: Input should be greater than or equal to 0"),
    ("teacher:\n  model: mlp\n  train: {epochs: 99999999999}\n", r"^r\.yaml:3: teacher\.train\.epochs: Input should be less than or equal to 10000"),
    (MINIMAL + "data: {batch_size: 10000000000}\n", r"^r\.yaml:3: data\.batch_size: Input should be less than or equal to 1048576"),
    (MINIMAL + "export: {batch_sizes: [1, 100000000]}\n", r"^r\.yaml:3: export\.batch_sizes: batch sizes must be .*\[1, 65536\]"),
    (MINIMAL + "data:\n  source: {kind: image-folder, path: x, size: [0, 32]}\n", r"^r\.yaml:4: data\.source\.size: size must be two integers"),
    (MINIMAL + "data:\n  source: {kind: image-folder, path: x, size: [32, -3]}\n", r"^r\.yaml:4: data\.source\.size: .*\(got \[32, -3\]\)"),
    (MINIMAL + "data:\n  source: {kind: image-folder, path: x, size: [32, 1000000]}\n", r"^r\.yaml:4: data\.source\.size: "),
    (MINIMAL + "device: cuda:99999999999999999999\n", r"^r\.yaml:3: device: "),
])
def test_out_of_range_numbers(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text, "r.yaml")


def _spec_models():
    """Every pydantic model a recipe is made of."""
    import inspect

    from pydantic import BaseModel

    from kdcli.config import data, ensembles, losses, recipe, train

    found = {}
    for mod in (recipe, data, train, ensembles, losses):
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, BaseModel) and cls.__module__ == mod.__name__ and cls.model_fields:
                found[cls.__name__] = cls
    return sorted(found.values(), key=lambda c: c.__name__)


def _number_fields():
    out = []
    for cls in _spec_models():
        for name, f in cls.model_fields.items():
            ann = str(f.annotation)
            kind = "float" if ann in ("<class 'float'>", "float | None", "typing.Optional[float]") else \
                "int" if ann in ("<class 'int'>", "int | None", "typing.Optional[int]") else None
            if kind:
                out.append(pytest.param(cls, f.alias or name, kind, id=f"{cls.__name__}.{name}"))
    return out


@pytest.mark.parametrize("cls, key, kind", _number_fields())
def test_every_number_field_is_finite_and_bounded(cls, key, kind):
    # every float refuses inf and nan; every int and float has an upper bound below 1e30
    bad = [float("nan"), float("inf"), -float("inf"), 1e30] if kind == "float" else [10**30]
    for value in bad:
        with pytest.raises(Exception) as info:
            cls.model_validate({key: value})
        assert any(e["loc"][:1] == (key,) for e in info.value.errors()), (key, value, info.value.errors())


@pytest.mark.parametrize("model, message", [
    ("resnet7", r"^r\.yaml:2: teacher\.model: unknown model 'resnet7'; built-ins: cnn3, lenet5, mlp, .*resnet20.*pkg\.mod:factory"),
    ("nets/missing.py:make", r"^r\.yaml:2: teacher\.model: file '.*nets/missing\.py' not found \(got 'nets/missing\.py:make'"),
    ("nets/m.py:", r"^r\.yaml:2: teacher\.model: expected 'pkg\.mod:factory' or 'path/to/file\.py:factory'"),
    (":make", r"^r\.yaml:2: teacher\.model: expected 'pkg\.mod:factory'"),
    ("my models/m:make", r"^r\.yaml:2: teacher\.model: expected .*'my models/m' is neither a module path nor a \.py file"),
])
def test_model_names_are_checked_without_importing(tmp_path, model, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(f"teacher:\n  model: {model!r}\n", "r.yaml", tmp_path / "r.yaml")


def test_model_names_every_place_and_what_passes(tmp_path):
    import sys

    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "m.py").write_text("raise SystemExit('imported')\n")
    p = tmp_path / "r.yaml"
    # a file spec relative to the recipe's folder, a module spec (not imported), a built-in
    for spec in ("nets/m.py:make", str(tmp_path / "nets" / "m.py") + ":make", "nosuch_pkg_kdcli.mod:make", "resnet20"):
        p.write_text(f"teacher:\n  model: {spec!r}\n")
        assert load_recipe(p).teacher.model == spec
    assert "nosuch_pkg_kdcli" not in sys.modules
    for text, message in [
        (MINIMAL + "student: {model: resnet7}\n", r":3: student\.model: unknown model 'resnet7'"),
        ("teacher:\n  ensemble: specialists\n  generalist: {model: vgg16}\nstudent: {model: mlp}\n",
         r":3: teacher\.generalist\.model: unknown model 'vgg16'"),
        ("teacher: {ensemble: diversified, model: nets/other.py:f}\nstudent: {model: mlp}\n",
         r":1: teacher\.model: file .*other\.py' not found"),
        (MINIMAL + "data:\n  source: {kind: python, factory: nets/data.py:load}\n",
         r":4: data\.source\.factory: file .*data\.py' not found"),
        (MINIMAL + "data:\n  source: {kind: python, factory: loader}\n", r":4: data\.source\.factory: expected 'pkg\.mod:factory'"),
    ]:
        p.write_text(text)
        with pytest.raises(RecipeError, match=message):
            load_recipe(p)


SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))
SHARED_DATA = REPO.parent / "shared" / "data"
# The files each path-based source's reader looks for (kdcli.data.sources).
NEEDED = {"idx": ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                  "t10k-labels-idx1-ubyte"],
          "cifar10-bin": ["data_batch_1.bin", "data_batch_5.bin", "test_batch*.bin"]}


def test_the_package_ships_the_repository_recipes():
    """``pip install`` carries kdcli/recipes: the same files as recipes/, and the built-in default."""
    from kdcli.config.recipe import builtin_recipe_path

    assert SHIPPED, "no recipes/*.yaml"
    packaged = sorted((REPO / "kdcli" / "recipes").glob("*.yaml"))
    assert [p.name for p in packaged] == [p.name for p in SHIPPED]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(packaged, SHIPPED))
    assert builtin_recipe_path("quickstart").read_bytes() == (REPO / "recipes" / "quickstart.yaml").read_bytes()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    """Each shipped recipe loads, says what its teacher is, and is named in the README."""
    r = load_recipe(path)
    # a single teacher names its model; an ensemble teacher says which kind it is
    assert (getattr(r.teacher, "model", None) or r.teacher.ensemble) and r.path == path
    assert r.base_dir == path.parent
    # something to do: a resource target to prune to, or a declared student to distil into
    assert r.target.macs is not None or r.target.params is not None or r.student.model is not None
    assert f"`{path.name}`" in (REPO / "README.md").read_text() or f"recipes/{path.name}" in \
        (REPO / "README.md").read_text(), f"README does not mention {path.name}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_data_is_bundled_or_in_shared_data(path):
    """A recipe's data is either bundled (digits) or a relative path that, resolved against the
    recipe's folder (from recipes/ or through kdcli/recipes), lands in ../shared/data on a folder
    holding the files its reader needs."""
    import os

    r = load_recipe(path)
    spec = r.data.source_spec
    if spec.kind == "digits":
        return
    assert spec.kind in NEEDED, f"{path.name}: a shipped recipe reads {spec.kind}, which has no check here"
    assert not Path(spec.path).is_absolute(), f"{path.name}: data.source.path {spec.path} only works on one machine"
    target = Path(os.path.realpath(r.resolve(spec.path)))
    assert target.parent == Path(os.path.realpath(SHARED_DATA)), (path.name, target)
    packaged = load_recipe(REPO / "kdcli" / "recipes" / path.name)
    assert Path(os.path.realpath(packaged.resolve(spec.path))) == target
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    for name in NEEDED[spec.kind]:
        assert list(target.glob(name)) or list(target.glob(name + ".gz")), f"{path.name}: {target} lacks {name}"
