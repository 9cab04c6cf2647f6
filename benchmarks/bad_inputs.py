"""Benchmark: how kdcli answers bad inputs, attacks and faults, across every command.

Runs a matrix of cases (bad recipes, ``--set`` overrides, checkpoints, crafted ``.kdc`` model
files, data sources, flags, and faults such as Ctrl-C, SIGKILL and two runs in one run
directory) against ``kdcli train``, ``compress``, ``export``, ``analyze``, ``recipe validate``
and ``recipe show``, each as a subprocess in a temporary directory, and records per case:

- the exit code (a bad input should give 2, a quality gate 3, Ctrl-C 130; 1 means a bug);
- whether a Python traceback was printed;
- whether the one-line message (the ``error: ...`` line) names what it is about: each case
  declares the substrings (a file name, a field path such as ``target.macs``, a flag such as
  ``--threads``) that the message must contain, compared case-insensitively;
- for attacker cases, whether a sentinel file appeared (code from the input ran);
- for fault cases, whether the run directory holds a half-written or lost file.

A case *fails* when it exits 1 or with another code than expected, prints a traceback, runs
code, does not name its subject, or (fault cases) leaves a half-written or lost file. Many
cases are expected to fail on the current code: the script measures, it does not fix.

Prints one JSON object on stdout (progress goes to stderr)::

    .venv/bin/python benchmarks/bad_inputs.py [--only SUBSTRING] [--list] [--json-cases]
                                              [--kdcli-src DIR] [--keep]

``--kdcli-src DIR`` runs ``python -m kdcli.cli`` with ``DIR`` first on ``PYTHONPATH`` (e.g. a
``git archive`` of another revision) instead of ``.venv/bin/kdcli``. Training commands get
``--threads 1``; runs are tiny (the built-in digits data, one or a few epochs); the whole
matrix takes about 6 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import random
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
TRACEBACK = "Traceback (most recent call last)"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# The small recipe every case starts from: the quickstart's digits MLP with tiny budgets.
BASE_RECIPE = """\
seed: 0
device: cpu
data:
  source: digits
  val_fraction: 0.15
  batch_size: 64
teacher:
  model: mlp
  model_args: {hidden: [256, 256]}
  train: {epochs: 1, lr: 0.05}
student:
  from: pruned-teacher
distill:
  losses:
    - {kind: kd, temperature: 4, weight: 0.9}
    - {kind: ce, weight: 0.1}
  train: {epochs: 1, lr: 0.02}
prune:
  importance: magnitude
  steps: 2
  final_epochs: 1
target:
  macs: 0.3
  max_accuracy_drop: 0.02
export:
  batch_sizes: [1, 64]
  latency_budget_s: 0.5
"""

# compress settings of the fault cases: ~3 s a step on 2 cores, so that a signal lands mid-step.
SLOW_SETS = ["--set", "teacher.train.epochs=1", "--set", "distill.train.epochs=20", "--set", "data.batch_size=16",
             "--set", "prune.steps=2", "--set", "prune.final_epochs=1"]
# the first run of the concurrency cases: a step lasts far longer than a second process needs to start
VERY_SLOW_SETS = [a.replace("distill.train.epochs=20", "distill.train.epochs=400") for a in SLOW_SETS]
TINY_SETS = ["--set", "teacher.train.epochs=1", "--set", "distill.train.epochs=1", "--set", "prune.steps=2"]
MLP_FLAGS = ["--model", "mlp", "--model-args", '{"hidden": [256, 256]}', "--input-shape", "1,8,8", "--num-classes", "10"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ processes


class Proc:
    """A kdcli subprocess in its own process group, its stdout/stderr collected by threads so
    that a case can wait for a progress line (``wait_for``) before signalling it."""

    def __init__(self, argv: list[str], *, cwd: Path, env: dict, mem_limit: int):
        def limits():  # a runaway allocation must not take the shared machine down
            if mem_limit > 0:
                resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))

        self.t0 = time.perf_counter()
        self.p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, start_new_session=True, preexec_fn=limits)
        self.pid = self.p.pid
        self.out: list[str] = []
        self.err: list[str] = []
        self._cv = threading.Condition()
        self._threads = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                         for s, b in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._threads:
            t.start()

    def _pump(self, stream, buf: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            with self._cv:
                buf.append(raw.decode("utf-8", "replace"))
                self._cv.notify_all()
        stream.close()

    def wait_for(self, pattern: str, timeout: float) -> bool:
        """Block until a stderr line matches ``pattern`` (True), the process ends or time runs out."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cv:
            while True:
                for line in self.err[seen:]:
                    if rx.search(line):
                        return True
                seen = len(self.err)
                left = deadline - time.monotonic()
                if left <= 0 or self.p.poll() is not None:
                    return any(rx.search(line) for line in self.err)
                self._cv.wait(min(left, 0.2))

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process group, as a terminal's Ctrl-C does."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def finish(self, timeout: float) -> tuple[int | str, str, str, float]:
        """``(exit code or 'timeout', stdout, stderr, seconds)``; a process past ``timeout`` is killed."""
        try:
            rc: int | str = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.p.wait()
            rc = "timeout"
        for t in self._threads:
            t.join(timeout=5)
        return rc, "".join(self.out), "".join(self.err), time.perf_counter() - self.t0


# ----------------------------------------------------------------------------------------- cases


@dataclass
class Outcome:
    """What running a case produced; ``problems`` are fault-check failures, ``notes`` are facts."""

    rc: int | str
    stdout: str
    stderr: str
    seconds: float
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    command: list | None = None  # the command whose exit code is judged, when not the case's argv


@dataclass
class Case:
    """One bad input or fault.

    ``subject``: substrings the error line must contain (all of them; a tuple inside means any
    one of its strings). ``sentinel``: a file that appears only if code from the input ran.
    ``runner``: a custom procedure (fault cases); otherwise ``argv`` (after ``kdcli``) is run."""

    name: str
    category: str
    argv: list = field(default_factory=list)
    expect: tuple = (2,)
    subject: list = field(default_factory=list)
    sentinel: Path | None = None
    cwd: Path | None = None
    timeout: float = 90.0
    runner: Callable | None = None
    skip: str | None = None
    why: str = ""  # what a careful user expects, when it is not obvious


class Ctx:
    """The temporary tree the cases run in, and how to start kdcli."""

    def __init__(self, root: Path, kdcli: list[str], env: dict, mem_limit: int, src: Path = REPO):
        self.root, self.kdcli, self.env, self.mem_limit, self.src = root, kdcli, env, mem_limit, src
        self.work = root / "work"  # default cwd: relative outputs (runs/, export/) land here
        self.rec = root / "recipes"
        self.ck = root / "ckpt"
        self.kdc = root / "kdc"
        self.data = root / "data"
        self.sent = root / "sentinels"
        self.runs = root / "runs"
        self.teacher = root / "teacher.kdc"
        self._interrupted: tuple[Path, Outcome] | None = None
        self.cuda = False

    def s(self, name: str) -> Path:
        """The sentinel file of an attacker input."""
        return self.sent / f"{name}.flag"

    def start(self, argv: list[str], cwd: Path | None = None) -> Proc:
        return Proc(self.kdcli + [str(a) for a in argv], cwd=cwd or self.work, env=self.env,
                    mem_limit=self.mem_limit)

    def run(self, argv: list[str], cwd: Path | None = None, timeout: float = 90.0) -> Outcome:
        rc, out, err, secs = self.start(argv, cwd).finish(timeout)
        return Outcome(rc, out, err, secs)

    def short(self, argv: list) -> str:
        text = shlex.join(["kdcli"] + [str(a) for a in argv])
        return text.replace(str(self.root), "$TMP").replace(str(REPO), "$REPO")


# -------------------------------------------------------------------------------------- fixtures


class _Evil:
    """Pickles as ``os.system(command)``: whoever unpickles it unsafely runs the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def recipe_variant(old: str, new: str, base: str = BASE_RECIPE) -> str:
    if old not in base:
        raise AssertionError(f"recipe fixture: {old!r} not in the base recipe")
    return base.replace(old, new, 1)


def make_fixtures(ctx: Ctx) -> None:
    """Train the small teacher once and write every crafted file the cases read."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    for d in (ctx.work, ctx.rec, ctx.ck, ctx.kdc, ctx.data, ctx.sent, ctx.runs):
        d.mkdir(parents=True, exist_ok=True)
    ctx.cuda = torch.cuda.is_available()
    log("fixtures: training the teacher (kdcli train, 1 epoch)")
    o = ctx.run(["train", "--threads", "1", "--set", "teacher.train.epochs=1", "--out", ctx.teacher], timeout=300)
    if o.rc != 0 or not ctx.teacher.is_file():
        raise SystemExit(f"fixture teacher failed (exit {o.rc}):\n{o.stderr[-2000:]}")
    base = torch.load(ctx.teacher, map_location="cpu", weights_only=True)
    sd = base["state_dict"]
    rnd = random.Random(0)

    # --- recipes
    write(ctx.rec / "base.yaml", BASE_RECIPE)
    R = {
        "yaml_unclosed.yaml": recipe_variant("model_args: {hidden: [256, 256]}", "model_args: {hidden: [256, 256]"),
        "yaml_indent.yaml": recipe_variant("  val_fraction: 0.15", "   val_fraction: 0.15\n batch: 3"),
        "yaml_tab.yaml": recipe_variant("  steps: 2", "\tsteps: 2"),
        "unknown_top.yaml": BASE_RECIPE + "sed: 1\n",
        "unknown_nested.yaml": recipe_variant("  steps: 2", "  stepz: 2"),
        "steps_type.yaml": recipe_variant("  steps: 2", "  steps: three"),
        "losses_type.yaml": recipe_variant("  losses:\n    - {kind: kd, temperature: 4, weight: 0.9}\n"
                                           "    - {kind: ce, weight: 0.1}", "  losses: kd"),
        "macs_1e400.yaml": recipe_variant("  macs: 0.3", "  macs: 1e400"),
        "macs_inf_float.yaml": recipe_variant("  macs: 0.3", "  macs: 1.0e+400"),
        "macs_negative.yaml": recipe_variant("  macs: 0.3", "  macs: -0.5"),
        "macs_fraction.yaml": recipe_variant("  macs: 0.3", "  macs: 1.5"),
        "temperature_inf.yaml": recipe_variant("temperature: 4", "temperature: .inf"),
        "temperature_nan.yaml": recipe_variant("temperature: 4", "temperature: .nan"),
        "temperature_zero.yaml": recipe_variant("temperature: 4", "temperature: 0"),
        "epochs_negative.yaml": recipe_variant("train: {epochs: 1, lr: 0.05}", "train: {epochs: -1, lr: 0.05}"),
        "steps_zero.yaml": recipe_variant("  steps: 2", "  steps: 0"),
        "dup_key.yaml": recipe_variant("  steps: 2", "  steps: 2\n  steps: 5"),
        "dup_section.yaml": BASE_RECIPE + "target:\n  macs: 0.9\n",
        "tag_apply.yaml": recipe_variant("seed: 0", f'seed: !!python/object/apply:os.system ["touch {ctx.s("tag_apply")}"]'),
        "tag_name.yaml": recipe_variant("  model: mlp", "  model: !!python/name:os.system"),
        "tag_train.yaml": recipe_variant("seed: 0", f'seed: !!python/object/apply:os.system ["touch {ctx.s("tag_train")}"]'),
        "model_unknown.yaml": recipe_variant("  model: mlp", "  model: resnet21"),
        "model_module_missing.yaml": recipe_variant("  model: mlp", "  model: nosuch_mod_xyz:factory"),
        "model_function_missing.yaml": recipe_variant("  model: mlp", "  model: kdcli.models.zoo:no_such_fn"),
        "model_file_missing.yaml": recipe_variant("  model: mlp", "  model: missing_model.py:build"),
        "model_file_broken.yaml": recipe_variant("  model: mlp", "  model: broken_model.py:build"),
        "model_not_module.yaml": recipe_variant("  model: mlp\n  model_args: {hidden: [256, 256]}",
                                                "  model: kdcli.models:builtin_names\n  model_args: {}"),
        "model_args_bad.yaml": recipe_variant("model_args: {hidden: [256, 256]}", "model_args: {hidden: abc}"),
        "empty.yaml": "",
        "list.yaml": "- seed\n- data\n",
        "deep.yaml": "seed: " + "[" * 20000 + "]" * 20000 + "\n",
        "seed_huge.yaml": recipe_variant("seed: 0", "seed: 1180591620717411303424"),
        "device_tpu.yaml": recipe_variant("device: cpu", "device: tpu"),
        "batch_zero.yaml": recipe_variant("  batch_size: 64", "  batch_size: 0"),
        "val_fraction.yaml": recipe_variant("  val_fraction: 0.15", "  val_fraction: 1.5"),
        "opset_low.yaml": recipe_variant("  batch_sizes: [1, 64]", "  batch_sizes: [1, 64]\n  opset: 7"),
        "loss_kind.yaml": recipe_variant("{kind: ce, weight: 0.1}", "{kind: foo, weight: 0.1}"),
        "drop_range.yaml": recipe_variant("  max_accuracy_drop: 0.02", "  max_accuracy_drop: 5"),
        "teacher_ckpt_missing.yaml": recipe_variant("  train: {epochs: 1, lr: 0.05}",
                                            "  checkpoint: nope_teacher.pt\n  train: {epochs: 1, lr: 0.05}"),
    }
    for name, text in R.items():
        write(ctx.rec / name, text)
    write(ctx.rec / "binary.yaml", bytes(rnd.randrange(256) for _ in range(2048)))
    write(ctx.rec / "latin1.yaml", ("# r\xe9glage du mod\xe8le\n" + BASE_RECIPE).encode("latin-1"))
    (ctx.rec / "a_directory.yaml").mkdir(exist_ok=True)
    write(ctx.rec / "broken_model.py", "raise RuntimeError('this model file is broken')\n")

    # --- user checkpoints
    good = ctx.ck / "good.pt"
    torch.save(sd, good)
    raw = good.read_bytes()
    (ctx.ck / "a_dir.pt").mkdir(exist_ok=True)
    write(ctx.ck / "empty.pt", b"")
    write(ctx.ck / "truncated.pt", raw[: len(raw) // 2])
    write(ctx.ck / "random.pt", bytes(rnd.randrange(256) for _ in range(4096)))
    with open(ctx.ck / "evil_torch.pt", "wb") as fh:
        torch.save({"state_dict": _Evil(f"touch {ctx.s('evil_torch')}")}, fh)
    with open(ctx.ck / "evil_pickle.pt", "wb") as fh:
        pickle.dump(_Evil(f"touch {ctx.s('evil_pickle')}"), fh, protocol=2)
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), ctx.ck / "whole_module.pt")
    torch.save({"foo.weight": torch.zeros(3, 3)}, ctx.ck / "wrong_keys.pt")
    bad_shape = dict(sd)
    first = next(k for k in sd if k.endswith("weight"))
    bad_shape[first] = torch.zeros(7, 7)
    torch.save(bad_shape, ctx.ck / "wrong_shapes.pt")
    nan_sd = {k: v.clone() for k, v in sd.items()}
    nan_sd[first].fill_(float("nan"))
    torch.save(nan_sd, ctx.ck / "nan_weights.pt")
    torch.save([1, 2, 3], ctx.ck / "a_list.pt")
    write(ctx.ck / "garbage.safetensors", bytes(rnd.randrange(256) for _ in range(1024)))
    write(ctx.ck / "bad_header.safetensors", (50).to_bytes(8, "little") + b"{not json at all" + b"\0" * 40)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(ctx.ck / "wrong_keys.safetensors"))

    # --- crafted .kdc model files
    def kdc(path: Path, mutate=None, obj=None) -> Path:
        o = copy.deepcopy(base) if obj is None else obj
        if mutate is not None:
            mutate(o)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(o, path)
        return path

    def spec(name, args):
        def m(o):
            o["model"]["name"], o["model"]["args"] = name, args
        return m

    kdc(ctx.kdc / "os_system.kdc", spec("os:system", {"command": f"touch {ctx.s('kdc_os_system')}"}))
    kdc(ctx.kdc / "builtins_exec.kdc", spec("builtins:exec", {
        "source": f"import pathlib; pathlib.Path({str(ctx.s('kdc_builtins_exec'))!r}).touch()"}))
    kdc(ctx.kdc / "subprocess_run.kdc", spec("subprocess:run", {"args": ["touch", str(ctx.s("kdc_subprocess_run"))]}))
    evil_py = ("import pathlib\npathlib.Path({s!r}).touch()\nimport torch.nn as nn\n\n"
               "def factory(input_shape, num_classes, **kw):\n"
               "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    write(ctx.kdc / "rel" / "evil.py", evil_py.format(s=str(ctx.s("kdc_evil_relpy"))))
    kdc(ctx.kdc / "rel" / "evil_rel.kdc", spec("evil.py:factory", {}))
    write(ctx.kdc / "abs" / "evil_abs.py", evil_py.format(s=str(ctx.s("kdc_evil_abspy"))))
    kdc(ctx.kdc / "evil_abs.kdc", spec(f"{ctx.kdc / 'abs' / 'evil_abs.py'}:factory", {}))
    kdc(ctx.kdc / "ensemble_os.kdc", spec("kdcli.ensembles.build:averaged_ensemble", {
        "member": {"name": "os:system", "args": {"command": f"touch {ctx.s('kdc_ensemble_os')}"}}, "members": 1}))
    with open(ctx.kdc / "evil_pickle.kdc", "wb") as fh:
        torch.save({"format": "kdcli-model", "format_version": 1, "model": _Evil(f"touch {ctx.s('kdc_evil_pickle')}")}, fh)
    kdc(ctx.kdc / "version2.kdc", lambda o: o.update(format_version=2))
    kdc(ctx.kdc / "no_model.kdc", lambda o: o.pop("model"))
    kdc(ctx.kdc / "no_state_dict.kdc", lambda o: o.pop("state_dict"))
    kdc(ctx.kdc / "not_kdc_format.kdc", lambda o: o.update(format="something-else"))

    def shape(s):
        return lambda o: o["model"].update(input_shape=s)

    kdc(ctx.kdc / "shape_negative.kdc", shape([-1, 8, 8]))
    kdc(ctx.kdc / "shape_zero.kdc", shape([0, 8, 8]))
    kdc(ctx.kdc / "shape_huge.kdc", shape([1, 10 ** 9, 10 ** 9]))
    kdc(ctx.kdc / "classes_negative.kdc", lambda o: o["model"].update(num_classes=-3))
    kdc(ctx.kdc / "history_index.kdc", lambda o: o.update(pruning_history=[["features.1", True, [999999]]]))
    kdc(ctx.kdc / "history_module.kdc", lambda o: o.update(pruning_history=[["no.such.module", True, [0]]]))
    kdc(ctx.kdc / "history_malformed.kdc", lambda o: o.update(pruning_history=["x"]))

    def nan(o):
        w = next(k for k in o["state_dict"] if k.endswith("weight"))
        o["state_dict"][w] = torch.full_like(o["state_dict"][w], float("nan"))

    kdc(ctx.kdc / "nan_weights.kdc", nan)
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    other_sd = {f"features.{k}" if not k.startswith("2") else f"classifier.{k[2:]}": v
                for k, v in other.state_dict().items()}
    kdc(ctx.kdc / "other_model_state.kdc", lambda o: o.update(state_dict=other_sd))
    kdc(ctx.kdc / "bad_model_args.kdc", lambda o: o["model"].update(args={"hidden": "abc"}))
    kdc(ctx.kdc / "metadata_list.kdc", lambda o: o.update(metadata=["not", "a", "mapping"]))
    tb = ctx.teacher.read_bytes()
    write(ctx.kdc / "truncated.kdc", tb[: len(tb) // 2])
    write(ctx.kdc / "empty.kdc", b"")

    # --- data
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 8, 8, generator=g)
    y = torch.arange(200) % 10
    torch.save({"x": x, "y": torch.arange(200) % 15}, ctx.data / "labels_oor.pt")
    torch.save({"x": torch.rand(200, 3, 16, 16, generator=g), "y": y}, ctx.data / "shape_wrong.pt")
    xn = x.clone()
    xn[::7] = float("nan")
    torch.save({"x": xn, "y": y}, ctx.data / "nan_inputs.pt")
    np.savez(ctx.data / "nonnumeric.npz", x=np.array([["a"] * 64] * 200).reshape(200, 1, 8, 8), y=np.arange(200) % 10)
    torch.save({"x": ["one", "two", "three"], "y": [0, 1, 2]}, ctx.data / "nonnumeric.pt")
    torch.save({"x": torch.zeros(0, 1, 8, 8), "y": torch.zeros(0, dtype=torch.int64)}, ctx.data / "empty_set.pt")
    (ctx.data / "empty_images").mkdir(exist_ok=True)
    for c in ("cat", "dog"):
        (ctx.data / "no_images" / c).mkdir(parents=True, exist_ok=True)
    (ctx.data / "idx_truncated").mkdir(exist_ok=True)
    write(ctx.data / "idx_truncated" / "train-images-idx3-ubyte", (2051).to_bytes(4, "big") + b"\0\0")
    write(ctx.data / "idx_truncated" / "train-labels-idx1-ubyte", (2049).to_bytes(4, "big") + b"\0")
    data_recipe = 'data:\n  source: {kind: tensors, path: %s}\n  val_fraction: 0.15\n  batch_size: 64\n'

    def with_data(path: Path, teacher_ckpt: bool) -> str:
        text = recipe_variant("data:\n  source: digits\n  val_fraction: 0.15\n  batch_size: 64\n", data_recipe % path)
        if teacher_ckpt:
            text = recipe_variant("  train: {epochs: 1, lr: 0.05}",
                                  f"  checkpoint: {ctx.teacher}\n  train: {{epochs: 1, lr: 0.05}}", text)
        return text

    for stem in ("labels_oor", "shape_wrong"):
        write(ctx.rec / f"data_{stem}_teacher.yaml", with_data(ctx.data / f"{stem}.pt", True))
    for stem in ("nan_inputs", "nonnumeric", "empty_set"):
        write(ctx.rec / f"data_{stem}.yaml", with_data(ctx.data / f"{stem}.pt", False))
    for name in ("evil_torch", "evil_pickle", "whole_module", "nan_weights", "missing"):
        text = recipe_variant("  train: {epochs: 1, lr: 0.05}",
                              f"  checkpoint: {ctx.ck / (name + '.pt')}\n  train: {{epochs: 1, lr: 0.05}}")
        write(ctx.rec / f"ckpt_{name}.yaml", text)

    # --- flags
    write(ctx.root / "a_file.txt", "a regular file, not a directory\n")
    ro = ctx.root / "readonly"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    write(ctx.root / "secret.yaml", "secret: do not print me\n")


# ------------------------------------------------------------------------------------ run dirs


def check_run_dir(d: Path, *, tmp_is_problem: bool = True) -> tuple[list[str], list[str]]:
    """Problems (half-written or lost files) and notes of a run directory after a fault."""
    import torch
    import yaml

    problems, notes = [], []
    if not d.is_dir():
        return [f"run directory {d.name} is missing"], notes
    for p in sorted(d.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(d)
        if p.name.endswith(".tmp"):
            (problems if tmp_is_problem else notes).append(f"leftover temporary file {rel}")
            continue
        try:
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".jsonl":
                for line in p.read_text().splitlines():
                    json.loads(line)
            elif p.suffix in (".yaml", ".yml"):
                yaml.safe_load(p.read_text())
            elif p.suffix == ".kdc":
                obj = torch.load(p, map_location="cpu", weights_only=True)
                if not (isinstance(obj, dict) and obj.get("format") == "kdcli-model" and "state_dict" in obj):
                    problems.append(f"{rel}: not a complete kdcli model file")
            elif p.suffix == ".html" and not p.read_text().rstrip().endswith("</html>"):
                problems.append(f"{rel}: HTML report cut short")
            elif p.stat().st_size == 0:
                problems.append(f"{rel}: empty file")
        except Exception as exc:  # noqa: BLE001 - any read failure means a half-written file
            problems.append(f"{rel}: half-written ({type(exc).__name__}: {str(exc)[:80]})")
    state = d / "state.json"
    if state.is_file():
        try:
            st = json.loads(state.read_text())
            for key in ("student_file", "best_file", "teacher_file"):
                if st.get(key) and not (d / st[key]).is_file():
                    problems.append(f"state.json {key} {st[key]} is lost")
        except (json.JSONDecodeError, AttributeError):
            pass
    return problems, notes


def _interrupt_compress(ctx: Ctx, run_dir: Path, *, sig: int, after: str, delay: float) -> Outcome:
    """Start the slow tiny compress into ``run_dir``, signal it ``delay`` s after a stderr line
    matching ``after``, and return its outcome with the run directory checked."""
    argv = ["compress", "--threads", "1", "--no-export", *SLOW_SETS, "--out", run_dir]
    p = ctx.start(argv)
    seen = p.wait_for(after, timeout=120)
    if seen:
        time.sleep(delay)
    finished_early = p.p.poll() is not None
    p.signal(sig)
    rc, out, err, secs = p.finish(timeout=120)
    o = Outcome(rc, out, err, secs, command=argv)
    if not seen or finished_early:
        o.problems.append(f"harness: the run ended before the signal (saw {after!r}: {seen})")
    return o


def interrupted_run(ctx: Ctx) -> tuple[Path, Outcome]:
    """A run interrupted by SIGINT in the middle of step 2 (made once, then copied)."""
    if ctx._interrupted is None:
        d = ctx.runs / "interrupted"
        shutil.rmtree(d, ignore_errors=True)
        o = _interrupt_compress(ctx, d, sig=signal.SIGINT, after=r"^step 1: val", delay=0.7)
        ctx._interrupted = (d, o)
    return ctx._interrupted


def copy_interrupted(ctx: Ctx, name: str) -> Path:
    src, _ = interrupted_run(ctx)
    dst = ctx.runs / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def resume(ctx: Ctx, d: Path, timeout: float = 180) -> Outcome:
    argv = ["compress", "--threads", "1", "--no-export", "--resume", d]
    o = ctx.run(argv, timeout=timeout)
    o.command = argv
    return o


# -- fault runners (each returns an Outcome; the exit code judged is the documented one)

def fault_sigint_compress(ctx: Ctx, case: Case) -> Outcome:
    d, o = interrupted_run(ctx)
    o = copy.copy(o)
    o.problems = list(o.problems)
    pr, notes = check_run_dir(d)
    o.problems += pr
    o.notes += notes
    if not (d / "state.json").is_file():
        o.notes.append("no state.json after the signal")
    return o


def fault_sigint_at_step_end(ctx: Ctx, case: Case) -> Outcome:
    d = ctx.runs / "sigint_step_end"
    shutil.rmtree(d, ignore_errors=True)
    o = _interrupt_compress(ctx, d, sig=signal.SIGINT, after=r"^step 1: val", delay=0.0)
    pr, notes = check_run_dir(d)
    o.problems += pr
    o.notes += notes
    return o


def fault_sigint_resume(ctx: Ctx, case: Case) -> Outcome:
    d = copy_interrupted(ctx, "sigint_resume")
    o = resume(ctx, d)
    pr, notes = check_run_dir(d)
    o.problems += pr
    o.notes += notes
    if o.rc in (0, 3) and not (d / "student.kdc").is_file():
        o.problems.append("student.kdc lost: not written by the resumed run")
    return o


def fault_sigkill_resume(ctx: Ctx, case: Case) -> Outcome:
    d = ctx.runs / "sigkill"
    shutil.rmtree(d, ignore_errors=True)
    k = _interrupt_compress(ctx, d, sig=signal.SIGKILL, after=r"^step 1: val", delay=0.7)
    pr, notes = check_run_dir(d, tmp_is_problem=False)  # a kill may leave a temporary name, never a torn file
    o = resume(ctx, d)
    o.problems += k.problems + [f"after the kill: {p}" for p in pr]
    o.notes += [f"after the kill: {n}" for n in notes]
    pr, notes = check_run_dir(d, tmp_is_problem=False)
    o.problems += [f"after resume: {p}" for p in pr]
    o.notes += [f"after resume: {n}" for n in notes]
    if o.rc in (0, 3) and not (d / "student.kdc").is_file():
        o.problems.append("student.kdc lost: not written by the resumed run")
    return o


def _second_while_running(ctx: Ctx, case: Case, second: Callable[[Path], list], grace: float = 15.0) -> Outcome:
    """Start a very slow compress A; once A is distilling its first step, run ``second(run_dir)``
    as B. B's outcome is judged: a refusal takes a few seconds, so a B still running after
    ``grace`` s was not refused (it is interrupted then). A must have survived B: it is then
    interrupted with SIGINT and must exit 130 with its run directory whole."""
    d = ctx.runs / case.name
    shutil.rmtree(d, ignore_errors=True)
    a = ctx.start(["compress", "--threads", "1", "--no-export", *VERY_SLOW_SETS, "--out", d])
    seen = a.wait_for(r"^step 1: τ", timeout=120)
    b_argv = second(d)
    b = ctx.start(b_argv)
    problems = []
    try:
        b.p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        problems.append(f"the second process was not refused: still running after {grace:.0f} s (interrupted)")
        b.signal(signal.SIGINT)
    rc, out, err, secs = b.finish(timeout=60)
    a_alive = a.p.poll() is None
    a.signal(signal.SIGINT)
    a_rc, _, a_err, _ = a.finish(timeout=60)
    o = Outcome(rc, out, err, secs, command=b_argv)
    case.subject = [s.replace("{PID}", str(a.pid)) if isinstance(s, str) else s for s in case.subject]
    if not seen:
        problems.append("harness: the first run never reached step 1")
    if not a_alive:
        problems.append(f"the running compress (pid {a.pid}) died while the second ran: exit {a_rc}: "
                        f"{first_error_line(a_err)}")
    elif a_rc != 130:
        problems.append(f"the running compress (pid {a.pid}), interrupted afterwards, exited {a_rc}, not 130: "
                        f"{first_error_line(a_err)}")
    pr, notes = check_run_dir(d)
    o.problems = problems + [f"run directory: {p}" for p in pr]
    o.notes = notes + [f"first run pid {a.pid} exit {a_rc}"]
    return o


def fault_concurrent_compress(ctx: Ctx, case: Case) -> Outcome:
    return _second_while_running(
        ctx, case, lambda d: ["compress", "--threads", "1", "--no-export", *SLOW_SETS, "--out", d])


def fault_concurrent_resume(ctx: Ctx, case: Case) -> Outcome:
    return _second_while_running(ctx, case, lambda d: ["compress", "--threads", "1", "--no-export", "--resume", d])


def fault_overwrite_running(ctx: Ctx, case: Case) -> Outcome:
    return _second_while_running(
        ctx, case, lambda d: ["compress", "--threads", "1", "--no-export", *SLOW_SETS, "--out", d, "--overwrite"])


def _resume_after(edit: Callable[[Path], None], name: str):
    def runner(ctx: Ctx, case: Case) -> Outcome:
        d = copy_interrupted(ctx, name)
        edit(d)
        return resume(ctx, d)
    return runner


def _edit_recipe(d: Path) -> None:
    p = d / "recipe.yaml"
    text = p.read_text()
    if "macs: 0.3" not in text:
        raise AssertionError("run dir recipe.yaml has no 'macs: 0.3'")
    p.write_text(text.replace("macs: 0.3", "macs: 0.5"))


def _drop_step(d: Path) -> None:
    st = json.loads((d / "state.json").read_text())
    (d / st["student_file"]).unlink()


def _truncate(rel: str, keep: float = 0.5):
    def edit(d: Path) -> None:
        p = d / rel
        b = p.read_bytes()
        p.write_bytes(b[: int(len(b) * keep)])
    return edit


def _evil_teacher(ctx: Ctx):
    def edit(d: Path) -> None:
        shutil.copy(ctx.kdc / "os_system_resume.kdc", d / "teacher.kdc")
    return edit


def fault_resume_evil_teacher(ctx: Ctx, case: Case) -> Outcome:
    import torch

    obj = torch.load(ctx.teacher, map_location="cpu", weights_only=True)
    obj["model"]["name"], obj["model"]["args"] = "os:system", {"command": f"touch {case.sentinel}"}
    torch.save(obj, ctx.kdc / "os_system_resume.kdc")
    return _resume_after(_evil_teacher(ctx), "r_teacher")(ctx, case)


def fault_sigint_train(ctx: Ctx, case: Case) -> Outcome:
    out = ctx.runs / "sigint_train" / "teacher.kdc"
    shutil.rmtree(out.parent, ignore_errors=True)
    argv = ["train", "--threads", "1", "--set", "teacher.train.epochs=400", "--set", "data.batch_size=16", "--out", out]
    p = ctx.start(argv)
    seen = p.wait_for(r"teacher epoch 2/", timeout=120)
    p.signal(signal.SIGINT)
    rc, so, se, secs = p.finish(timeout=60)
    o = Outcome(rc, so, se, secs, command=argv)
    if not seen:
        o.problems.append("harness: training ended before the signal")
    pr, notes = check_run_dir(out.parent) if out.parent.exists() else ([], ["no output directory"])
    o.problems += pr
    o.notes += notes
    return o


# ---------------------------------------------------------------------------------- the matrix


def build_cases(ctx: Ctx) -> list[Case]:
    T = ["--threads", "1"]
    cases: list[Case] = []

    def add(name, category, argv=(), **kw):
        cases.append(Case(name, category, list(argv), **kw))

    rec, ck, kd, data = ctx.rec, ctx.ck, ctx.kdc, ctx.data

    # --- controls: the harness and the fixtures work (expected to pass)
    add("control_validate", "control", ["recipe", "validate", rec / "base.yaml"], expect=(0,))
    add("control_analyze_kdc", "control", ["analyze", ctx.teacher, *T], expect=(0,))
    add("control_analyze_plain_ckpt", "control", ["analyze", ck / "good.pt", *MLP_FLAGS, *T], expect=(0,))
    add("control_export_gate", "control", ["export", ctx.teacher, "--out", ctx.work / "exp_gate",
                                           "--fail-if", "latency_ms > 0"], expect=(3,), subject=["latency_ms"],
        timeout=180, why="a failed --fail-if gate exits 3 and names the gate")

    # --- 1. recipes (recipe validate unless said)
    def v(name, fname, subject, **kw):
        add(f"recipe_{name}", "recipe", ["recipe", "validate", rec / fname], subject=[fname, *subject], **kw)

    def tr(name, fname, subject, **kw):
        add(f"recipe_{name}_train", "recipe", ["train", rec / fname, *T, "--out", ctx.work / f"t_{name}.kdc"],
            subject=subject, **kw)

    v("yaml_unclosed_flow", "yaml_unclosed.yaml", [])
    v("yaml_bad_indent", "yaml_indent.yaml", [])
    v("unknown_top_key", "unknown_top.yaml", ["sed"])
    v("unknown_nested_key", "unknown_nested.yaml", ["prune.stepz"])
    v("wrong_type_steps", "steps_type.yaml", ["prune.steps"])
    v("macs_1e400", "macs_1e400.yaml", ["target.macs"], why="1e400 is out of range (infinite)")
    v("macs_1.0e+400", "macs_inf_float.yaml", ["target.macs"], why="an infinite MACs target is impossible")
    v("macs_fraction_over_1", "macs_fraction.yaml", ["target.macs"])
    v("temperature_inf", "temperature_inf.yaml", ["temperature"], why="an infinite temperature is impossible")
    v("temperature_nan", "temperature_nan.yaml", ["temperature"])
    v("epochs_negative", "epochs_negative.yaml", ["teacher.train.epochs"])
    v("prune_steps_zero", "steps_zero.yaml", ["prune.steps"])
    v("duplicate_key", "dup_key.yaml", ["steps"], why="YAML forbids duplicate keys; the second value silently wins")
    v("duplicate_section", "dup_section.yaml", ["target"], why="a second target: section silently replaces the first")
    v("yaml_tag_apply_os_system", "tag_apply.yaml", [], sentinel=ctx.s("tag_apply"))
    v("yaml_tag_python_name", "tag_name.yaml", [])
    tr("yaml_tag_apply", "tag_train.yaml", ["tag_train.yaml"], sentinel=ctx.s("tag_train"))
    v("model_unknown_builtin", "model_unknown.yaml", ["teacher.model"],
      why="resnet21 is no built-in; validate can tell without running code")
    tr("model_unknown_builtin", "model_unknown.yaml", ["resnet21"])
    tr("model_module_missing", "model_module_missing.yaml", ["nosuch_mod_xyz"])
    tr("model_file_missing", "model_file_missing.yaml", ["missing_model.py"])
    tr("model_file_raises", "model_file_broken.yaml", ["broken_model.py"])
    v("empty_file", "empty.yaml", [])
    v("directory", "a_directory.yaml", [])
    v("binary_garbage", "binary.yaml", [])
    v("non_utf8", "latin1.yaml", [])
    v("deep_nesting", "deep.yaml", [])
    tr("seed_huge", "seed_huge.yaml", ["seed"], why="a seed over 64 bits cannot seed torch's generators")
    v("device_tpu", "device_tpu.yaml", ["device"])
    add("recipe_checkpoint_missing_compress", "recipe",
        ["compress", rec / "teacher_ckpt_missing.yaml", *T, "--no-export", "--out", ctx.runs / "r_ckpt_missing"],
        subject=["nope_teacher.pt"])

    # --- 2. --set
    def st(name, sets, subject, cmd="validate", **kw):
        argv = ["recipe", "validate", rec / "base.yaml"] if cmd == "validate" else \
            [cmd, rec / "base.yaml", *T, "--out", ctx.runs / f"set_{name}"] + (["--no-export"] if cmd == "compress" else [])
        for s_ in sets:
            argv += ["--set", s_]
        add(f"set_{name}", "set", argv, subject=subject, **kw)

    st("missing_equals", ["prune.steps"], ["--set", "prune.steps"])
    st("unknown_key", ["prune.stepz=2"], ["prune.stepz"])
    st("unknown_section", ["nosuch.key=1"], ["nosuch"])
    st("bad_value", ["prune.steps=abc"], ["prune.steps"])
    st("path_into_scalar", ["prune.steps.x=1"], ["prune.steps"])
    st("macs_1e400", ["target.macs=1e400"], ["target.macs"])
    st("yaml_tag_value", [f'prune.steps=!!python/object/apply:os.system ["touch {ctx.s("set_tag")}"]'], ["prune.steps"],
       sentinel=ctx.s("set_tag"))
    st("list_index", ["distill.losses[0].temperature=0"], [("losses[0]", "losses.0")],
       why="an index in the key path is either supported or named in the error")
    st("source_without_path", ["data.source=idx"], ["path"])
    st("train_missing_equals", ["teacher.train.epochs"], ["--set"], cmd="train")
    st("compress_unknown_key", ["prune.stepz=2"], ["prune.stepz"], cmd="compress")

    # --- 3. user checkpoints
    def ca(name, fname, subject=(), **kw):
        add(f"ckpt_{name}_analyze", "checkpoint", ["analyze", ck / fname, *MLP_FLAGS, *T],
            subject=[fname, *subject], **kw)

    def ce(name, fname, subject=(), **kw):
        add(f"ckpt_{name}_export", "checkpoint",
            ["export", ck / fname, *MLP_FLAGS, "--out", ctx.work / f"exp_ck_{name}"], subject=[fname, *subject],
            timeout=180, **kw)

    def cc(name, subject=(), **kw):
        add(f"ckpt_{name}_compress", "checkpoint",
            ["compress", rec / f"ckpt_{name}.yaml", *T, "--no-export", "--out", ctx.runs / f"ck_{name}"],
            subject=[f"{name}.pt", *subject], **kw)

    trust = ["--trust-checkpoint"]
    ca("missing", "missing.pt")
    ca("directory", "a_dir.pt")
    ca("empty", "empty.pt")
    ca("truncated", "truncated.pt")
    ca("random_bytes", "random.pt")
    ca("evil_reduce_torch_save", "evil_torch.pt", trust, sentinel=ctx.s("evil_torch"))
    ca("evil_reduce_pickle", "evil_pickle.pt", trust, sentinel=ctx.s("evil_pickle"))
    ca("whole_module", "whole_module.pt", trust)
    ca("wrong_keys", "wrong_keys.pt")
    ca("wrong_shapes", "wrong_shapes.pt")
    ca("nan_weights", "nan_weights.pt", why="weights that are NaN are a corrupt checkpoint")
    ca("safetensors_garbage", "garbage.safetensors")
    ca("safetensors_wrong_keys", "wrong_keys.safetensors")
    ce("evil_reduce_torch_save", "evil_torch.pt", trust, sentinel=ctx.s("evil_torch"))
    ce("evil_reduce_pickle", "evil_pickle.pt", trust, sentinel=ctx.s("evil_pickle"))
    ce("whole_module", "whole_module.pt", trust)
    ce("nan_weights", "nan_weights.pt")
    add("ckpt_evil_as_export_teacher", "checkpoint",
        ["export", ctx.teacher, "--teacher", ck / "evil_torch.pt", *MLP_FLAGS, "--out", ctx.work / "exp_evil_teacher"],
        subject=["evil_torch.pt", "--trust-checkpoint"], sentinel=ctx.s("evil_torch"), timeout=180)
    cc("evil_torch", trust, sentinel=ctx.s("evil_torch"))
    cc("evil_pickle", trust, sentinel=ctx.s("evil_pickle"))
    cc("nan_weights")

    # --- 4. crafted .kdc model files (analyze, and export for the dangerous and odd ones)
    code_subject = lambda code: [("--trust-checkpoint",), code if isinstance(code, tuple) else (code,)]  # noqa: E731

    def k(name, path: Path, subject=(), export=False, cwd=None, **kw):
        rel = path.name
        add(f"kdc_{name}_analyze", "kdc", ["analyze", path, *T], subject=[rel, *subject], cwd=cwd, **kw)
        if export:
            add(f"kdc_{name}_export", "kdc", ["export", path, "--out", ctx.work / f"exp_kdc_{name}"],
                subject=[rel, *subject], cwd=cwd, timeout=180, **kw)

    k("spec_os_system", kd / "os_system.kdc", code_subject("os:system"), export=True, sentinel=ctx.s("kdc_os_system"))
    k("spec_builtins_exec", kd / "builtins_exec.kdc", code_subject("builtins:exec"),
      sentinel=ctx.s("kdc_builtins_exec"))
    k("spec_subprocess_run", kd / "subprocess_run.kdc", code_subject("subprocess:run"), export=True,
      sentinel=ctx.s("kdc_subprocess_run"))
    k("spec_evil_py_relative", kd / "rel" / "evil_rel.kdc", code_subject("evil.py"), export=True, cwd=kd / "rel",
      sentinel=ctx.s("kdc_evil_relpy"))
    k("spec_evil_py_absolute", kd / "evil_abs.kdc", code_subject("evil_abs.py"), export=True,
      sentinel=ctx.s("kdc_evil_abspy"))
    k("spec_ensemble_member_os_system", kd / "ensemble_os.kdc", code_subject(("os:system", "averaged_ensemble")),
      export=True, sentinel=ctx.s("kdc_ensemble_os"))
    k("evil_reduce_pickle", kd / "evil_pickle.kdc", [("--trust-checkpoint",)], export=True,
      sentinel=ctx.s("kdc_evil_pickle"))
    k("format_version_2", kd / "version2.kdc")
    k("missing_model", kd / "no_model.kdc")
    k("input_shape_negative", kd / "shape_negative.kdc", export=True)
    k("input_shape_zero", kd / "shape_zero.kdc")
    k("input_shape_huge", kd / "shape_huge.kdc")
    k("num_classes_negative", kd / "classes_negative.kdc")
    k("history_index_999999", kd / "history_index.kdc")
    k("history_no_module", kd / "history_module.kdc")
    k("nan_weights", kd / "nan_weights.kdc", export=True, why="NaN weights are a corrupt model file")
    k("state_dict_other_model", kd / "other_model_state.kdc")
    k("metadata_not_mapping", kd / "metadata_list.kdc")
    k("truncated", kd / "truncated.kdc")

    # --- 5. data
    def da(name, flag, subject, **kw):
        add(f"data_{name}_analyze", "data", ["analyze", ctx.teacher, "--data", flag, *T], subject=subject, **kw)

    da("labels_out_of_range", f"tensors:{data / 'labels_oor.pt'}", ["labels_oor.pt"],
       why="labels 10..14 do not exist for a 10-class model")
    da("wrong_input_shape", f"tensors:{data / 'shape_wrong.pt'}", ["shape_wrong.pt"],
       why="3x16x16 inputs for a 1x8x8 model")
    da("nan_inputs", f"tensors:{data / 'nan_inputs.pt'}", ["nan_inputs.pt"])
    da("non_numeric_npz", f"tensors:{data / 'nonnumeric.npz'}", ["nonnumeric.npz"])
    da("non_numeric_pt", f"tensors:{data / 'nonnumeric.pt'}", ["nonnumeric.pt"])
    da("empty_set", f"tensors:{data / 'empty_set.pt'}", ["empty_set.pt"])
    da("idx_missing", f"idx:{data / 'no_such_idx'}", ["no_such_idx"])
    da("cifar10_bin_missing", f"cifar10-bin:{data / 'no_such_cifar'}", ["no_such_cifar"])
    da("image_folder_empty", f"image-folder:{data / 'empty_images'}", ["empty_images"])
    da("image_folder_no_images", f"image-folder:{data / 'no_images'}", ["no_images"])
    da("unknown_kind", "parquet:/nowhere", ["--data"])
    for stem in ("labels_oor", "shape_wrong"):
        add(f"data_{stem}_compress_with_teacher", "data",
            ["compress", rec / f"data_{stem}_teacher.yaml", *T, "--no-export", "--out", ctx.runs / f"d_{stem}"],
            subject=[f"{stem}.pt"], why="data that does not fit the teacher's checkpoint")
    for stem in ("nan_inputs", "empty_set"):
        add(f"data_{stem}_train", "data", ["train", rec / f"data_{stem}.yaml", *T, "--out", ctx.work / f"t_{stem}.kdc"],
            subject=[f"{stem}.pt"])

    # --- 6. flags
    ro = ctx.root / "readonly"
    ro_skip = "running as root: chmod 0555 does not stop root's writes" if IS_ROOT else None
    f = lambda name, argv, subject, **kw: add(f"flag_{name}", "flag", argv, subject=subject, **kw)  # noqa: E731
    f("threads_0_train", ["train", "--threads", "0"], ["--threads"])
    f("threads_negative_compress", ["compress", "--threads", "-1", "--out", ctx.runs / "f_threads"], ["--threads"])
    f("threads_huge_train", ["train", "--threads", "99999999999", "--set", "teacher.train.epochs=1",
                             "--out", ctx.work / "t_threads.kdc"], ["--threads"])
    f("threads_huge_analyze", ["analyze", ctx.teacher, "--threads", "99999999999"], ["--threads"])
    f("device_cuda_x", ["train", *T, "--device", "cuda:x", "--out", ctx.work / "t_dev.kdc"], ["--device"])
    f("device_tpu_train", ["train", *T, "--device", "tpu", "--out", ctx.work / "t_dev.kdc"], ["--device"])
    f("device_cuda_absent", ["train", *T, "--device", "cuda", "--out", ctx.work / "t_dev.kdc"], ["--device"],
      skip="CUDA is available here" if ctx.cuda else None)
    f("batch_sizes_0_a", ["export", ctx.teacher, "--batch-sizes", "0,a", "--out", ctx.work / "exp_bs"],
      ["--batch-sizes"])
    f("input_shape_negative", ["analyze", ck / "good.pt", "--model", "mlp", "--input-shape", "-1,28,28",
                               "--num-classes", "10", *T], ["--input-shape"])
    f("model_args_list", ["analyze", ck / "good.pt", "--model", "mlp", "--model-args", "[1]",
                          "--input-shape", "1,8,8", "--num-classes", "10", *T], ["--model-args"])
    f("num_classes_0", ["analyze", ck / "good.pt", "--model", "mlp", "--input-shape", "1,8,8",
                        "--num-classes", "0", *T], ["--num-classes"])
    f("out_is_file_train", ["train", *T, "--set", "teacher.train.epochs=1", "--out", ctx.root / "a_file.txt"],
      [("--out", "a_file.txt")])
    f("out_is_file_compress", ["compress", *T, "--no-export", *TINY_SETS, "--out", ctx.root / "a_file.txt"],
      [("--out", "a_file.txt")])
    f("out_is_file_export", ["export", ctx.teacher, "--out", ctx.root / "a_file.txt"], [("--out", "a_file.txt")],
      timeout=180)
    f("out_is_file_analyze", ["analyze", ctx.teacher, *T, "--out", ctx.root / "a_file.txt"], [("--out", "a_file.txt")])
    f("out_readonly_train", ["train", *T, "--set", "teacher.train.epochs=1", "--out", ro / "sub" / "t.kdc"],
      [("--out", "readonly")], skip=ro_skip)
    f("out_readonly_compress", ["compress", *T, "--no-export", *TINY_SETS, "--out", ro / "run"],
      [("--out", "readonly")], skip=ro_skip)
    f("out_readonly_export", ["export", ctx.teacher, "--out", ro / "exp"], [("--out", "readonly")], skip=ro_skip,
      timeout=180)
    f("out_unwritable_proc_train", ["train", *T, "--set", "teacher.train.epochs=1",
                                    "--out", "/proc/kdcli-bad-inputs/t.kdc"], [("--out", "/proc/kdcli-bad-inputs")],
      why="an unwritable --out (root-proof: /proc) is bad input")
    f("fail_if_syntax", ["export", ctx.teacher, "--fail-if", "accuracy_drop >> 1", "--out", ctx.work / "exp_g1"],
      [("--fail-if", "accuracy_drop >> 1")])
    f("fail_if_unknown_metric", ["export", ctx.teacher, "--fail-if", "bogus_metric > 1", "--out", ctx.work / "exp_g2"],
      [("--fail-if", "bogus_metric")])
    f("fail_if_code", ["export", ctx.teacher, "--fail-if", f"__import__('os').system('touch {ctx.s('fail_if')}') > 1",
                       "--out", ctx.work / "exp_g3"], [("--fail-if", "__import__")], sentinel=ctx.s("fail_if"))
    f("opset_7", ["export", ctx.teacher, "--opset", "7", "--out", ctx.work / "exp_op7"], ["opset"], timeout=180)
    f("target_macs_1e400", ["analyze", ctx.teacher, *T, "--target-macs", "1e400"], ["--target-macs"])
    f("clusters_1", ["analyze", ctx.teacher, *T, "--data", "digits", "--clusters", "1"], ["--clusters"])
    f("resume_nonexistent", ["compress", *T, "--resume", ctx.runs / "no_such_run"], ["no_such_run"])
    f("resume_regular_file", ["compress", *T, "--resume", ctx.root / "a_file.txt"], ["a_file.txt"])
    f("resume_with_recipe", ["compress", rec / "base.yaml", *T, "--resume", ctx.runs / "no_such_run"], ["--resume"])
    f("unknown_option", ["train", "--bogus-flag"], ["--bogus-flag"])
    f("recipe_show_unknown", ["recipe", "show", "nope"], ["nope"])
    f("recipe_show_traversal", ["recipe", "show", os.path.relpath(ctx.root / "secret", (ctx.src / "kdcli" / "recipes").resolve())],
      ["secret"], why="recipe show prints built-in recipes only, not any YAML file reached by ../")

    # --- 7. faults
    def fl(name, runner, expect, subject, **kw):
        add(f"fault_{name}", "fault", [], runner=runner, expect=expect, subject=subject, timeout=300, **kw)

    fl("sigint_compress", fault_sigint_compress, (130,), ["--resume"],
       why="Ctrl-C mid-step: exit 130 with the resume hint, every file in the run directory complete")
    fl("sigint_at_step_end", fault_sigint_at_step_end, (130,), ["--resume"])
    fl("sigint_then_resume", fault_sigint_resume, (0, 3), [])
    fl("sigkill_then_resume", fault_sigkill_resume, (0, 3), [], why="a killed run resumes to the end")
    fl("concurrent_compress_same_dir", fault_concurrent_compress, (2,), [("{RUN}",)])
    fl("resume_while_running", fault_concurrent_resume, (2,), ["{PID}"],
       why="a second process on a run directory in use is refused, naming the holder")
    fl("overwrite_while_running", fault_overwrite_running, (2,), ["{PID}"],
       why="--overwrite must not delete the files of a run that is still going")
    fl("resume_edited_recipe", _resume_after(_edit_recipe, "r_edit"), (2,), ["target.macs"],
       why="the run's recipe.yaml changed since the run started: refuse, naming the changed keys")
    fl("resume_missing_step_file", _resume_after(_drop_step, "r_step"), (2,),
       ["step_001.kdc", "missing"])
    fl("resume_truncated_state", _resume_after(_truncate("state.json"), "r_state"), (2,), ["state.json"])
    fl("resume_corrupt_run_json", _resume_after(_truncate("run.json", 0.3), "r_runjson"), (2,),
       ["run.json"])
    fl("resume_truncated_step_file", _resume_after(_truncate("steps/step_001.kdc"), "r_trunc"),
       (2,), ["step_001.kdc"])
    fl("resume_evil_teacher_spec", fault_resume_evil_teacher, (2,),
       ["teacher.kdc", ("--trust-checkpoint",), ("os:system",)], sentinel=ctx.s("resume_evil_teacher"))
    fl("sigint_train", fault_sigint_train, (130,), [], why="Ctrl-C while training: exit 130, no half-written teacher")
    return cases


# ------------------------------------------------------------------------------------- judging


def first_error_line(stderr: str) -> str:
    """The ``error: ...`` line (click's ``Error: ...`` for usage errors), else the last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if re.match(r"^(error|Error)\b", ln):
            return ln
    return lines[-1] if lines else ""


def run_case(ctx: Ctx, case: Case) -> dict:
    if case.sentinel is not None:
        case.sentinel.unlink(missing_ok=True)
    if case.runner is not None:
        o = case.runner(ctx, case)
    else:
        o = ctx.run(case.argv, cwd=case.cwd, timeout=case.timeout)
    cmd = o.command if o.command is not None else case.argv
    message = first_error_line(o.stderr)
    traceback = TRACEBACK in o.stderr or TRACEBACK in o.stdout
    subjects = []
    for s in case.subject:
        alts = s if isinstance(s, tuple) else (s,)
        alts = tuple(str(a).replace("{RUN}", str(ctx.runs / case.name)).replace(str(ctx.root), "$TMP") for a in alts)
        subjects.append(alts)
    named = None
    shown = message.replace(str(ctx.root), "$TMP")  # a subject must not match the temporary folder's name
    if subjects:
        low = shown.lower()
        named = all(any(a.lower() in low for a in alts) for alts in subjects)
    ran = case.sentinel.exists() if case.sentinel is not None else None
    problems = []
    if o.rc not in case.expect:
        problems.append(f"exit {o.rc}, expected {'/'.join(map(str, case.expect))}")
    if traceback:
        problems.append("traceback printed")
    if named is False:
        missing = [" or ".join(a) for a in subjects if not any(x.lower() in shown.lower() for x in a)]
        problems.append(f"message does not name {', '.join(repr(m) for m in missing)}")
    if ran:
        problems.append("CODE RAN: sentinel created")
    problems += o.problems
    return {"name": case.name, "category": case.category, "command": ctx.short(cmd), "exit_code": o.rc,
            "expected": list(case.expect), "traceback": traceback, "message": shown[:400],
            "subject": [" | ".join(a) for a in subjects], "names_subject": named,
            "attacker": case.sentinel is not None, "code_ran": ran, "problems": problems, "notes": o.notes,
            "status": "fail" if problems else "pass", "seconds": round(o.seconds, 2),
            **({"expectation": case.why} if case.why else {})}


def summarize(results: list[dict], seconds: float, ctx: Ctx, args) -> dict:
    ran = [r for r in results if r["status"] != "skipped"]
    codes: dict[str, int] = {}
    for r in ran:
        codes[str(r["exit_code"])] = codes.get(str(r["exit_code"]), 0) + 1
    with_subject = [r for r in ran if r["names_subject"] is not None]
    cats: dict[str, dict] = {}
    for r in results:
        c = cats.setdefault(r["category"], {"cases": 0, "failed": 0, "skipped": 0})
        c["cases"] += 1
        c["failed"] += r["status"] == "fail"
        c["skipped"] += r["status"] == "skipped"
    failing = [{"name": r["name"], "category": r["category"], "command": r["command"], "exit_code": r["exit_code"],
                "message": r["message"], "problems": r["problems"]} for r in ran if r["status"] == "fail"]
    out = {
        "benchmark": "bad_inputs",
        "kdcli": " ".join(ctx.kdcli),
        "kdcli_src": str(ctx.src),
        "cases": len(results),
        "run": len(ran),
        "skipped": [{"name": r["name"], "reason": r["skip"]} for r in results if r["status"] == "skipped"],
        "passed": sum(r["status"] == "pass" for r in ran),
        "failed": len(failing),
        "exit_codes": dict(sorted(codes.items())),
        "tracebacks": sum(r["traceback"] for r in ran),
        "messages_naming_subject": sum(bool(r["names_subject"]) for r in with_subject),
        "cases_with_subject": len(with_subject),
        "code_ran": sum(bool(r["code_ran"]) for r in ran),
        "attacker_cases": sum(r["attacker"] for r in ran),
        "by_category": cats,
        "failing": failing,
        "seconds": round(seconds, 1),
        "root": IS_ROOT,
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if args.json_cases:
        out["results"] = results
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run only the cases whose name or category contains this substring")
    ap.add_argument("--list", action="store_true", help="print the cases (name, category, command) and exit")
    ap.add_argument("--json-cases", action="store_true", help="include every case's result in the JSON")
    ap.add_argument("--kdcli-src", type=Path, help="run `python -m kdcli.cli` with this folder first on PYTHONPATH")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (its path goes to stderr)")
    ap.add_argument("--mem-limit-gb", type=float, default=12.0,
                    help="address-space limit of each kdcli process (0: none), against runaway allocations")
    args = ap.parse_args(argv)

    env = dict(os.environ, NO_COLOR="1", COLUMNS="200", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    if args.kdcli_src:
        kdcli = [sys.executable, "-m", "kdcli.cli"]
        env["PYTHONPATH"] = os.pathsep.join([str(args.kdcli_src.resolve())] + [p for p in [env.get("PYTHONPATH")] if p])
    else:
        exe = REPO / ".venv" / "bin" / "kdcli"
        kdcli = [str(exe)] if exe.is_file() else [sys.executable, "-m", "kdcli.cli"]

    root = Path(tempfile.mkdtemp(prefix="kdcli-bad-inputs-"))
    ctx = Ctx(root, kdcli, env, int(args.mem_limit_gb * 2 ** 30),
              args.kdcli_src.resolve() if args.kdcli_src else REPO)
    try:
        cases = build_cases(ctx)
        if args.only:
            cases = [c for c in cases if args.only in c.name or args.only == c.category]
        if args.list:
            print(json.dumps([{"name": c.name, "category": c.category,
                               "command": ctx.short(c.argv) if c.argv else c.runner.__name__ if c.runner else "",
                               "expect": list(c.expect)} for c in cases], indent=1))
            return 0
        t0 = time.perf_counter()
        make_fixtures(ctx)
        cases = build_cases(ctx)  # again: a skip can depend on what the fixtures found (CUDA)
        if args.only:
            cases = [c for c in cases if args.only in c.name or args.only == c.category]
        results = []
        for i, case in enumerate(cases, 1):
            if case.skip:
                results.append({"name": case.name, "category": case.category, "command": ctx.short(case.argv),
                                "status": "skipped", "skip": case.skip})
                log(f"[{i}/{len(cases)}] {case.name}: skipped ({case.skip})")
                continue
            r = run_case(ctx, case)
            results.append(r)
            verdict = "ok" if r["status"] == "pass" else "FAIL: " + "; ".join(r["problems"])
            log(f"[{i}/{len(cases)}] {case.name}: exit {r['exit_code']} ({r['seconds']:.1f}s) {verdict}")
        stray = sorted(p.name for p in ctx.sent.glob("*")) if ctx.sent.is_dir() else []
        summary = summarize(results, time.perf_counter() - t0, ctx, args)
        summary["sentinels_left"] = stray
        sys.stdout.write(json.dumps(summary, indent=1) + "\n")
        return 0
    finally:
        ro = root / "readonly"
        if ro.exists():
            ro.chmod(0o755)
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
