"""The run directory of ``kdcli compress``: what it holds (``recipe.yaml``, ``run.json``,
``state.json`` with the step records, ``metrics.jsonl``, step model files), starting and resuming
a run, and the lock that keeps a directory to one run at a time. Files are written atomically
(:mod:`kdcli.files`) and by rank 0 only."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from kdcli import distributed
from kdcli.config.recipe import Recipe, load_recipe, parse_recipe
from kdcli.errors import InputError
from kdcli.files import atomic_write_json, atomic_write_text
from kdcli.models.utils import is_main_process

STATE_VERSION = 1


@dataclass
class StepRecord:
    """One DKDP step attempt, as logged."""

    step: int
    attempt: int
    tau: float | None
    aggressiveness: float
    target_macs: float | None
    macs: int
    params: int
    macs_ratio: float
    params_ratio: float
    val_accuracy: float
    accuracy_drop: float
    accepted: bool
    reason: str
    seconds: float
    latency_ms: float | None = None
    train_history: list = field(default_factory=list)
    teacher_val_accuracy: float | None = None  # the teaching teacher after distill.train_teacher
    forced: str | None = None  # why the target forced this step past the accuracy budget or the largest held cut
    latency_aim_ms: float | None = None  # a speed target: the latency the step aimed at
    predicted_latency_ms: float | None = None  # what the latency lookup table predicted for its plan


@dataclass
class State:
    """What ``state.json`` holds: enough to continue after the last finished step."""

    version: int = STATE_VERSION
    accepted_steps: int = 0
    attempts: int = 0
    aggressiveness: float = 1.0
    records: list = field(default_factory=list)
    student_file: str | None = None
    best_file: str | None = None
    best_val: float = -1.0
    pruning_done: bool = False
    finished: bool = False
    failed_macs: int | None = None  # MACs the last undone attempt cut to: its retry must cut less
    vid_lambda: dict = field(default_factory=dict)  # student file -> λ of the distillation that made it
    teacher_file: str | None = None  # the teaching teacher, when distill.train_teacher fine-tunes it
    undone: int = 0  # attempts undone so far (at most prune.max_retries)
    held_ratio: float | None = None  # the largest cut that held: the smallest MACs after/before of a kept step
    failed_ratio: float | None = None  # the MACs after/before of the last undone attempt
    warnings: list = field(default_factory=list)  # the loop's warnings, for the reports of a resumed run too


class RunDir:
    """The run directory's files, written atomically and by rank 0 only."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write_json(self, name: str, obj) -> None:
        if is_main_process():
            atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        if is_main_process():
            atomic_write_text(self.path / name, text)

    def write_metrics(self, records: list[dict]) -> None:
        self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def load_state(self) -> State:
        try:
            obj = json.loads((self.path / "state.json").read_text())
            return State(**obj)
        except FileNotFoundError:
            return State()
        except (json.JSONDecodeError, TypeError) as exc:
            raise InputError(f"{self.path / 'state.json'}: unreadable run state ({exc})") from None


_RUN_FILES = ("state.json", "run.json", "metrics.jsonl", "result.json", "student.kdc")


def start_run(recipe_path: Path | None, *, out_dir: Path | None = None, overrides=(), recipe_text: str | None = None,
              overwrite: bool = False) -> tuple[Recipe, Path]:
    """Validate the recipe, lock the run directory (:class:`kdcli.dkdp.run.RunLock`, held until
    :func:`compress` ends) and prepare it for a fresh run.

    A directory that holds an earlier run (one that finished a step: ``state.json``) is refused
    unless ``overwrite``; then that run's state, steps and student are removed (a ``teacher.kdc``
    stays: it is reused only if it was trained from the same seed, data and teacher spec). A
    directory whose run never finished a step (it failed on its data or model, say) is simply
    started again. A directory locked by a live run is refused, ``overwrite`` or not. Under
    torchrun rank 0 does this (and holds the lock) and every rank gets its result or its error."""
    if distributed.active():
        return distributed.on_main(start_run, recipe_path, out_dir=out_dir, overrides=overrides,
                                   recipe_text=recipe_text, overwrite=overwrite)
    if recipe_text is None:
        recipe = load_recipe(recipe_path, overrides)
        recipe_text = Path(recipe_path).read_text()
    else:
        recipe = parse_recipe(recipe_text, str(recipe_path), recipe_path, overrides)
    run_dir = Path(out_dir) if out_dir else recipe.default_out_dir()
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--out {run_dir}: is a file; a run directory is needed")
    lock = RunLock.acquire(run_dir)
    try:
        if (run_dir / "state.json").exists():
            if not overwrite:
                raise InputError(f"{run_dir}: already holds a run; continue it with --resume {run_dir}, "
                                 "start afresh with --overwrite, or choose another directory with --out")
        for name in _RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "steps", ignore_errors=True)
        rd = RunDir(run_dir)
        rd.write_text("recipe.yaml", recipe_text)
        rd.write_json("run.json", {"recipe_path": str(Path(recipe_path).resolve()) if recipe_path else None,
                                   "overrides": list(overrides), "recipe_sha256": recipe.sha256,
                                   "recipe": recipe.model_dump(mode="json", by_alias=True),
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except BaseException:
        lock.release()
        raise
    return recipe, run_dir


def resume_recipe(run_dir: Path, *, force: bool = False) -> Recipe:
    """The recipe of an existing run, with paths resolving against the original recipe's folder.

    A recipe copy changed since the run started (its hash differs from ``run.json``'s) is refused,
    naming the changed keys, unless ``force``; then ``run.json`` records the new hash."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"--resume {run_dir}: no such run directory")
    try:
        meta = json.loads((run_dir / "run.json").read_text())
        text = (run_dir / "recipe.yaml").read_text()
    except FileNotFoundError:
        raise InputError(f"--resume {run_dir}: not a kdcli run directory (no run.json / recipe.yaml)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{run_dir / 'run.json'}: unreadable run metadata ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{run_dir / 'run.json'}: unreadable run metadata (expected a mapping)")
    orig = Path(meta["recipe_path"]) if meta.get("recipe_path") else run_dir / "recipe.yaml"
    recipe = parse_recipe(text, str(run_dir / "recipe.yaml"), orig, meta.get("overrides", []))
    if meta.get("recipe_sha256") and recipe.sha256 != meta["recipe_sha256"]:
        # Runs started before run.json kept the recipe cannot name keys: any change counts.
        changed = (_changed_keys(meta["recipe"], recipe.model_dump(mode="json", by_alias=True))
                   if "recipe" in meta else ["(unknown keys)"])
        if changed and not force:
            raise InputError(f"{run_dir / 'recipe.yaml'}: changed since the run started"
                             f"{' (' + ', '.join(changed[:6]) + ')' if changed else ''}; resuming would mix two "
                             "recipes: restore it, start afresh with --overwrite, or pass --force to continue")
        RunDir(run_dir).write_json("run.json", {**meta, "recipe_sha256": recipe.sha256,
                                                "recipe": recipe.model_dump(mode="json", by_alias=True)})
    return recipe


def _changed_keys(old, new, prefix: str = "") -> list[str]:
    """The dotted key paths whose values differ between two recipe dumps (old may be None)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new)) for k in _changed_keys(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [prefix or "(recipe)"]




def resume_run(run_dir: Path, *, force: bool = False, flag: str = "--resume") -> Recipe:
    """The recipe of the run in ``run_dir``, to continue it (:func:`resume_recipe`), with the run's
    lock taken first so that a run live there is refused before its recipe is read; the lock stays
    held for the run (``compress`` takes it again, as this process's). ``flag`` names the option
    in messages (``--resume``, or the API's ``resume``). Under torchrun rank 0 takes the lock and
    reads the recipe, and every rank gets it (a run written by any number of processes resumes
    with any number: nothing in the run directory depends on it)."""
    if distributed.active():
        return distributed.on_main(resume_run, run_dir, force=force, flag=flag)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{flag} {run_dir}: no such run directory")
    lock = RunLock.acquire(run_dir)
    try:
        for tmp in run_dir.rglob(".*.tmp"):  # a write the killed run never finished (atomic_write's temporaries)
            tmp.unlink(missing_ok=True)
        return resume_recipe(run_dir, force=force)
    except BaseException:
        lock.release()
        raise


class RunLock:
    """An exclusive lock on a run directory (``flock`` on ``.lock`` inside it), held for a whole
    run so that a second process can neither run in nor ``--overwrite`` the same directory. The
    file records the holder's PID for the refusal message. The OS drops the lock when the holder
    dies, even by SIGKILL, so a stale ``.lock`` file never blocks a resume."""

    _held: dict[str, "RunLock"] = {}  # per process: flock conflicts between two opens of one file

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = None

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """The lock of ``run_dir``, taken now (or already held by this process); a directory
        locked by another process raises :class:`kdcli.errors.InputError` naming its PID."""
        import fcntl


        key = str(Path(run_dir).resolve())
        if key in cls._held:
            return cls._held[key]
        lock = cls(Path(run_dir))
        try:
            lock.path.mkdir(parents=True, exist_ok=True)
            fh = open(lock.path / ".lock", "a+")
        except OSError as exc:
            raise InputError(f"{run_dir}: cannot write the run directory ({exc.strerror})") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "unknown"
            fh.close()
            raise InputError(f"{run_dir}: a kdcli run is in progress there (PID {pid}); wait for it to end, or "
                             "choose another directory with --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        lock._fh = fh
        cls._held[key] = lock
        return lock

    def release(self) -> None:
        """Give the lock up (closing the file drops the flock)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._held.pop(str(self.path.resolve()), None)
