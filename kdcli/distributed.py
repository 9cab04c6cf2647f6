"""Several processes under ``torchrun``: PyTorch's own engine (torch.distributed and
DistributedDataParallel), and the few rules kdcli adds so that N processes give one run.

    torchrun --nproc-per-node 2 -m kdcli compress recipe.yaml

- :func:`setup` joins the process group that ``torchrun`` describes in the environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ...): gloo for CPU tensors and, where CUDA is present, NCCL for
  CUDA tensors, one GPU per local rank. Without ``torchrun`` nothing here does anything.
- Training (:func:`kdcli.train.loop.fit`) wraps its step in DistributedDataParallel
  (:func:`wrap_step`); the training loaders give each rank its share of one seeded permutation,
  and ``data.batch_size`` is the *global* batch (each of N ranks takes batch_size / N), so the
  recipe's learning rate means the same at any N and no scaling rule is needed.
- Evaluation is sharded and summed over ranks (:func:`kdcli.train.loop.evaluate`); data-driven
  importance scores are averaged over ranks before pruning, so every rank prunes the same
  channels (:func:`check_same` verifies it after each step).
- What depends on the clock, and everything written, happens on rank 0 only: :func:`on_main`
  runs a function there and gives its result, or its error, to every rank; the others wait.
- A failure on one rank stops all: ``torchrun`` ends the other processes, and the failing rank's
  one-line message is written to torchrun's error file (:func:`record_error`), so torchrun's
  summary names it as the root cause.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from kdcli.errors import KdcliError

__all__ = ["active", "barrier", "broadcast", "check_same", "launched", "on_main", "rank", "record_error",
           "setup", "sum_over_ranks", "teardown", "world_size", "wrap_step"]

TIMEOUT = timedelta(minutes=60)  # rank 0 may export or time latencies for minutes while the others wait
_local = threading.local()  # inside on_main's function on rank 0: no collectives


def launched() -> bool:
    """True in a process that ``torchrun`` started as one of several."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when collectives are to be used: a process group of more than one rank, and not
    inside :func:`on_main`'s function (which runs on rank 0 alone)."""
    return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and not getattr(_local, "alone", False))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks that share the work now (1 inside :func:`on_main`)."""
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup() -> bool:
    """Join torchrun's process group (once); True when this process is one of several."""
    if not launched():
        return False
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, timeout=TIMEOUT)
    return True


def teardown() -> None:
    """Leave the process group (at the end of a command under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """Under torchrun, a CUDA device means this rank's GPU (``LOCAL_RANK``): one GPU a process."""
    if launched() and device.type == "cuda":
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return device


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collectives of small tensors run: the current GPU under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled between the job's own processes)."""
    if not active():
        return obj
    box = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over ranks (float64 on the way, so that counts stay exact); every rank
    gets the same bytes back. Unchanged in one process."""
    if not active():
        return values
    buf = values.detach().to(_comm_device(), torch.float64).clone()
    dist.all_reduce(buf)
    return buf.to(values.device)


def all_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank."""
    if not active():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=_comm_device())
    dist.all_reduce(t)
    return bool(t.item() == 0)


@contextmanager
def _alone() -> Iterator[None]:
    before = getattr(_local, "alone", False)
    _local.alone = True
    try:
        yield
    finally:
        _local.alone = before


def on_main(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` run on rank 0 alone (no collectives inside it), its result given to
    every rank; an exception there is raised on every rank. In one process, just the call."""
    if not active():
        return fn(*args, **kwargs)
    out = None
    if rank() == 0:
        try:
            with _alone():
                out = (True, fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - every rank raises it
            out = (False, _picklable(exc))
    ok, value = broadcast(out)
    if not ok:
        raise value
    return value


def _picklable(exc: Exception) -> Exception:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def check_same(obj: Any, what: str) -> None:
    """Raise when ``obj`` (something small and comparable: a pruning plan, a structure) differs
    between ranks; ``what`` names it in the message."""
    if not active():
        return
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, obj)
    bad = [r for r, o in enumerate(seen) if o != seen[0]]
    if bad:
        raise KdcliError(f"{what} differs between ranks (rank 0 and rank {bad[0]}); the ranks must agree "
                         "(data-driven scores are averaged over ranks: a rank-dependent model or data source?)")


class _Step(nn.Module):
    """One training step's objective as a module that holds every trained module, so that
    DistributedDataParallel sees (and averages the gradients of) all their parameters: the
    student's and the distillation adapters' alike."""

    def __init__(self, objective: Callable, modules: list[nn.Module]):
        super().__init__()
        self.objective = objective
        self.trained = nn.ModuleList(modules)

    def forward(self, x, y, idx):
        return self.objective(x, y, idx)


def wrap_step(objective: Callable, modules: list[nn.Module], device: torch.device) -> Callable:
    """``objective`` as DistributedDataParallel runs it when several ranks train, else itself.

    ``static_graph``: the set of parameters a step uses is the same every step (a frozen teacher
    has none), which lets DDP skip the unused-parameter search and still allow parameters that no
    step uses."""
    if not active():
        return objective
    step = _Step(objective, modules)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(step, device_ids=ids, static_graph=True)


def record_error(message: str) -> None:
    """Write ``message`` to torchrun's error file (``TORCHELASTIC_ERROR_FILE``), in the format of
    torch.distributed.elastic's ``record``, so that torchrun's summary shows it as the root cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or not launched():
        return
    try:
        with open(path, "w") as fh:
            line = f"rank {rank()}: {message}"  # torchrun's summary shows py_callstack as the traceback
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                   "timestamp": str(int(time.time()))}}}, fh)
    except OSError:
        pass
