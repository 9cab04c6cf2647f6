"""Console output: rich on a terminal, plain line-oriented text in CI logs, silent for --json.

Library code reports through a :class:`Reporter` (``info`` lines, per-epoch ``metrics``, a
``progress`` context for long scans); the CLI picks the rendering. Nothing here imports torch.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class Reporter:
    """Where progress goes. ``quiet`` drops everything (for ``--json`` or library use)."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.rich = not quiet and self.stream.isatty()
        self._console = None
        if self.rich:
            from rich.console import Console

            self._console = Console(file=self.stream, highlight=False)

    def info(self, message: str) -> None:
        if self.quiet:
            return
        if self._console is not None:
            self._console.print(message)
        else:
            print(_strip_markup(message), file=self.stream, flush=True)

    def warn(self, message: str) -> None:
        """A ``warning:`` line (kept whole: no rich markup is read from ``message``)."""
        if self.quiet:
            return
        if self._console is not None:
            from rich.markup import escape

            self._console.print(f"[yellow]warning:[/yellow] {escape(message)}")
        else:
            print(f"warning: {message}", file=self.stream, flush=True)

    def metrics(self, prefix: str, m: dict) -> None:
        """One line per epoch: ``prefix epoch 3/10 loss 0.41 train 88.1% val 90.2% (1.2s)``."""
        parts = [f"{prefix} epoch {m.get('epoch')}/{m.get('epochs')}",
                 f"loss {m.get('train_loss', float('nan')):.4f}"]
        if "train_accuracy" in m:
            parts.append(f"train {100 * m['train_accuracy']:.2f}%")
        if "val_accuracy" in m:
            parts.append(f"val {100 * m['val_accuracy']:.2f}%")
        if "epoch_seconds" in m:
            parts.append(f"({m['epoch_seconds']:.1f}s)")
        self.info("  ".join(parts))

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator:
        """A progress bar with time left on a terminal; every ~10 % a plain line elsewhere.
        Yields ``advance(n=1)``."""
        if self.quiet:
            yield lambda n=1: None
            return
        if self._console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=self._console, transient=True) as bar:
                task = bar.add_task(description, total=total)
                yield lambda n=1: bar.advance(task, n)
            self.info(f"{description}: done ({total})")
            return
        state = {"done": 0, "next": 0.1, "t0": time.perf_counter()}

        def advance(n: int = 1) -> None:
            state["done"] += n
            frac = state["done"] / max(total, 1)
            if frac >= state["next"] or state["done"] == total:
                el = time.perf_counter() - state["t0"]
                left = el / frac * (1 - frac) if frac > 0 else 0.0
                print(f"{description}: {state['done']}/{total} ({el:.0f}s, ~{left:.0f}s left)",
                      file=self.stream, flush=True)
                while state["next"] <= frac:
                    state["next"] += 0.1

        yield advance

    def print_renderable(self, renderable) -> None:
        """Print a rich renderable (table) to the terminal, or its plain text in logs."""
        if self.quiet:
            return
        from rich.console import Console

        console = self._console or Console(file=self.stream, highlight=False, width=140,
                                           no_color=True, force_terminal=False)
        console.print(renderable)


def _strip_markup(text: str) -> str:
    try:
        from rich.text import Text

        return Text.from_markup(text).plain
    except Exception:  # malformed markup: print as is
        return text
