"""The run directory: one run at a time (the lock), resume only with the recipe it started with,
a failed start that leaves nothing to clear, and a resume after a kill that writes the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import kdcli.dkdp.compress as C
from kdcli.cli import app
from kdcli.errors import InputError
from kdcli.config.recipe import builtin_recipe_path
from kdcli.dkdp.run import RunLock
from kdcli.files import check_writable_dir

FAST = ["teacher.train.epochs=4", "distill.train.epochs=1", "prune.final_epochs=1", "prune.steps=3",
        "export.enabled=false", "device=cpu"]
runner = CliRunner()


def _start(tmp_path, name="run", extra=(), overwrite=False):
    return C.start_run(builtin_recipe_path("quickstart"), out_dir=tmp_path / name, overrides=[*FAST, *extra],
                       overwrite=overwrite)


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the run directory's lock until killed."""
    code = ("import sys, time; from kdcli.dkdp.run import RunLock; RunLock.acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_run_cannot_be_overwritten_or_resumed(tmp_path):
    recipe, run_dir = _start(tmp_path)
    RunLock.acquire(run_dir).release()  # start_run held it for this process
    proc = _holder(run_dir)
    try:
        for args in (["compress", "--out", run_dir, "--overwrite"], ["compress", "--resume", run_dir]):
            res = runner.invoke(app, [str(a) for a in args])
            assert res.exit_code == 2, res.output
            assert f"PID {proc.pid}" in res.output and str(run_dir) in res.output
        assert (run_dir / "run.json").is_file()  # nothing of the live run was removed
    finally:
        proc.kill()
        proc.wait()
    # the holder is gone (killed: the OS dropped its lock), so the directory is free again
    _start(tmp_path, overwrite=True)


def test_the_lock_is_reentrant_in_a_process_and_released(tmp_path):
    a = RunLock.acquire(tmp_path / "d")
    assert RunLock.acquire(tmp_path / "d") is a
    assert (tmp_path / "d" / ".lock").read_text().strip() == str(os.getpid())
    a.release()
    proc = _holder(tmp_path / "d")  # another process can take it now
    proc.kill()
    proc.wait()


def _killed_after(tmp_path, name, n_distils, extra=()):
    """A run killed (KeyboardInterrupt) at the start of its ``n_distils``-th distillation."""
    real, calls = C._distil, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n_distils:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    C._distil = dying
    try:
        recipe, run_dir = _start(tmp_path, name, extra)
        with pytest.raises(KeyboardInterrupt):
            C.compress(recipe, run_dir, device=torch.device("cpu"))
    finally:
        C._distil = real
        RunLock.acquire(tmp_path / name).release()
    return tmp_path / name


def test_resume_refuses_a_changed_recipe_naming_the_keys(tmp_path):
    run_dir = _killed_after(tmp_path, "r", 2)
    copy = run_dir / "recipe.yaml"
    text = copy.read_text()
    copy.write_text(text + "\n# a comment changes no key\n")
    C.resume_recipe(run_dir)  # accepted: the recipe is the same
    copy.write_text(text.replace("importance: magnitude", "importance: taylor").replace("temperature: 4",
                                                                                          "temperature: 2"))
    with pytest.raises(InputError) as err:
        C.resume_recipe(run_dir)
    msg = str(err.value)
    assert "changed since the run started (distill.losses[0].temperature, prune.importance)" in msg
    res = runner.invoke(app, ["compress", "--resume", str(run_dir)])
    assert res.exit_code == 2 and "prune.importance" in res.output and "--force" in res.output
    recipe = C.resume_recipe(run_dir, force=True)
    assert recipe.prune.importance == "taylor"
    C.resume_recipe(run_dir)  # run.json now records the recipe it continues with


def test_a_missing_step_file_is_named_missing(tmp_path):
    run_dir = _killed_after(tmp_path, "m", 2)
    state = json.loads((run_dir / "state.json").read_text())
    (run_dir / state["student_file"]).unlink()
    with pytest.raises(InputError, match="missing from the run directory"):
        C.compress(C.resume_recipe(run_dir), run_dir, device=torch.device("cpu"))


def test_a_start_that_failed_before_any_step_starts_again_without_overwrite(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(builtin_recipe_path("quickstart").read_text().replace(
        "source: digits", f"source: {{kind: idx, path: {tmp_path / 'nowhere'}}}"))
    res = runner.invoke(app, ["compress", str(bad), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "nowhere" in res.output
    assert not (tmp_path / "run" / "state.json").exists()
    bad.write_text(builtin_recipe_path("quickstart").read_text())  # corrected
    recipe, run_dir = C.start_run(bad, out_dir=tmp_path / "run")  # no --overwrite needed
    assert recipe.data.source_spec.kind == "digits"


def test_out_that_cannot_hold_a_run_is_refused_up_front(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    with pytest.raises(InputError, match="--out .*is a file"):
        check_writable_dir(f, "--out")
    res = runner.invoke(app, ["train", "--out", str(f / "teacher.kdc")])
    assert res.exit_code == 2 and "--out" in res.output and f.read_text() == "keep me"
    res = runner.invoke(app, ["compress", "--out", str(f)])
    assert res.exit_code == 2 and "--out" in res.output and f.read_text() == "keep me"


def _bytes(run_dir: Path) -> bytes:
    return (run_dir / "student.kdc").read_bytes()


def _killed_at(tmp_path, name, where: str, n: int) -> Path:
    """A run killed (KeyboardInterrupt) at the ``n``-th call of ``where``: ``state`` (just after
    ``state.json`` is written: a step boundary) or ``batch`` (a distillation step, mid-epoch)."""
    from kdcli.distill.distiller import Distiller

    calls = {"n": 0}
    if where == "state":
        real = C.RunDir.write_json

        def patched(self, fname, obj):
            real(self, fname, obj)
            if fname == "state.json":
                calls["n"] += 1
                if calls["n"] == n:
                    raise KeyboardInterrupt
        owner, attr = C.RunDir, "write_json"
    else:
        real = Distiller.forward

        def patched(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(self, *args, **kwargs)
        owner, attr = Distiller, "forward"
    setattr(owner, attr, patched)
    try:
        recipe, run_dir = _start(tmp_path, name)
        with pytest.raises(KeyboardInterrupt):
            C.compress(recipe, run_dir, device=torch.device("cpu"))
    finally:
        setattr(owner, attr, real)
    return tmp_path / name


def test_resume_after_a_kill_anywhere_writes_the_same_student_bytes(tmp_path):
    """Killed at the start of a step's distillation, just after each step boundary (state.json
    written), and in the middle of distillation epochs (the 20th and 50th batch): every resumed
    student.kdc equals the uninterrupted run's, byte for byte."""
    recipe, run_dir = _start(tmp_path, "clean")
    C.compress(recipe, run_dir, device=torch.device("cpu"))
    clean = _bytes(run_dir)
    kills = [("distil", 2), ("distil", 3), ("state", 1), ("state", 2), ("state", 3), ("batch", 20), ("batch", 50)]
    for where, n in kills:
        name = f"{where}-{n}"
        killed = (_killed_after(tmp_path, name, n) if where == "distil" else _killed_at(tmp_path, name, where, n))
        C.compress(C.resume_recipe(killed), killed, device=torch.device("cpu"))
        assert _bytes(killed) == clean, (where, n)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_writes_the_same_bytes(tmp_path):
    """A real process killed by SIGKILL once its first step is on disk, resumed by another."""
    sets = [a for s in FAST + ["teacher.model=cnn3", "teacher.model_args={widths: [8, 16, 16], hidden: 32}"]
            for a in ("--set", s)]
    cmd = [sys.executable, "-m", "kdcli.cli", "compress", "--no-export", *sets]
    subprocess.run([*cmd, "--out", str(tmp_path / "clean")], check=False, capture_output=True, timeout=600)
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "state.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)  # into the next step
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # nothing half-written under a final name; SIGKILL may leave a write's hidden temporary
    assert all(p.name.startswith(".") for p in (tmp_path / "killed").rglob("*.tmp"))
    res = subprocess.run([*cmd[:4], "--no-export", "--resume", str(tmp_path / "killed")], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode in (0, 3), res.stderr
    assert _bytes(tmp_path / "killed") == _bytes(tmp_path / "clean")
    assert not list((tmp_path / "killed").rglob("*.tmp"))  # the resume cleared any temporary left
