"""The stage runner: resumable stages, run in order or as two chains side by side in forked workers, with a live
line per running stage. The lab (`composites.lab`) is its user; nothing in it knows about the lab's stages.

A stage is `(name, fn, what)`: `fn(progress)` does the work and may return updates for the state file; `what` is
the line shown while it runs. Finished stages are recorded (with their seconds) in the state file, atomically, so a
rerun resumes where the last one stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..atomic import write_bytes_atomic
from ..device import cpu_threads, usable_cpus
from ..errors import VocabdriftError
from ..progress import Mode, every_seconds, say, set_prefix

log = logging.getLogger(__name__)


# A stage: (name, fn, what). fn(progress) does the work and may return updates for the state file.
Stage = tuple[str, Callable[[bool], "dict[str, Any] | None"], str]


class StageRunner:
    """A state file (e.g. OUT/lab.json): the settings that decide the results, and the finished stages with their
    seconds; written atomically. A stage already finished is skipped, so a rerun resumes.

    Args:
        path: the state file.
        settings: what the stages' results depend on; a state file made with other settings is refused.
        progress: say each stage on stderr and show the live lines of stages running side by side (True, on a
            terminal), or say each stage and the steps of training stages as plain lines at a steady pace ("lines",
            in a log: `vocabdrift.progress`).
        mismatch: the error for a state file made with other settings.
    """

    def __init__(self, path: Path, settings: dict[str, Any], progress: Mode, *, mismatch: str) -> None:
        self.path = path
        self.progress = progress
        want = json.loads(json.dumps(settings, default=str))
        if self.path.exists():
            state = json.loads(self.path.read_text())
            if {k: state.get(k) for k in want} != want:
                raise VocabdriftError(mismatch)
        else:
            state = {**want, "stages": {}}
        self.state = state
        self._console: Any = None  # the live display's console while one is shown

    def save(self) -> None:
        write_bytes_atomic(self.path, json.dumps(self.state, indent=2, ensure_ascii=False, default=str).encode())

    def done(self, name: str) -> bool:
        return name in self.state["stages"]

    def run(self, stage: Stage, *, threads: int | None = None) -> None:
        """Run a stage unless a previous run finished it (on `threads` CPU threads if given); say so either way."""
        name, fn, what = stage
        if self.done(name):
            self._say(f"[dim]✓ {what} (cached)[/dim]")
            return
        self._say(f"[bold]→ {what} …[/bold]")
        t = time.perf_counter()
        with cpu_threads(threads) if threads else contextlib.nullcontext():
            update = fn(self.progress)
        self._finish(name, what, time.perf_counter() - t, update)

    def run_side_by_side(self, chains: Sequence[Sequence[Stage]]) -> None:
        """Run chains of stages (each in order), two chains at a time, every stage on one CPU thread.

        Why: the lab's models are so small that a second thread speeds a training step up by only ~15%, while two
        processes on one thread each get 1.47x the work of one on two done (bench/lab_threads.py). A chain runs
        in a forked process, which shares the parent's imported libraries. The numbers do not depend on it: where
        forking is not an option (a GPU, which a forked child cannot use, or a single core) the same stages run
        here one after the other, on one thread too.
        """
        import torch

        todo = self._pending(chains)
        # fork only where it is the platform's way (Linux; macOS defaults to spawn for good reasons)
        if torch.cuda.is_available() or usable_cpus() < 2 or len(todo) < 2 or sys.platform != "linux":
            for c in todo:
                for stage in c:
                    self.run(stage, threads=1)
            return
        self._fork_chains(todo, note="one thread, beside the other chain")

    def run_beside(self, chain: Sequence[Stage], meanwhile: Callable[[], object]) -> None:
        """Run `chain` in a forked worker while this process calls `meanwhile` (not called if `chain` is done).

        Why: the corpus and the tokenizer need neither torch nor transformers' models, and the later stages spend
        seconds importing them: done at once, those seconds are saved, and the workers forked later inherit the
        imports. The worker is forked before torch is imported here, and does not import it. Elsewhere (not
        Linux, one CPU) the stages run here, then `meanwhile`.
        """
        todo = self._pending([chain])
        if not todo:  # a rerun: the later stages import what they still need themselves
            return
        if usable_cpus() < 2 or sys.platform != "linux":
            for stage in todo[0]:
                self.run(stage)
            meanwhile()
            return
        self._fork_chains(todo, note="beside the imports of the later stages", meanwhile=meanwhile)

    def _pending(self, chains: Sequence[Sequence[Stage]]) -> list[list[Stage]]:
        """Each chain's unfinished stages (chains with none left out); the finished ones are said to be cached."""
        todo = []
        for c in chains:
            for name, _, what in c:
                if self.done(name):
                    self._say(f"[dim]✓ {what} (cached)[/dim]")
            if rest := [s for s in c if not self.done(s[0])]:
                todo.append(list(rest))
        return todo

    def _fork_chains(self, chains: list[list[Stage]], *, note: str,
                     meanwhile: Callable[[], object] | None = None) -> None:
        import multiprocessing as mp
        from multiprocessing.connection import wait

        ctx = mp.get_context("fork")
        waiting, running = list(chains), {}  # reader -> worker process
        failure: tuple[str, str] | None = None
        with self._board() as show:
            try:
                while waiting or running:
                    while waiting and len(running) < 2 and failure is None:
                        reader, p = self._start_worker(ctx, waiting.pop(0), note)
                        running[reader] = p
                    if meanwhile is not None:  # the workers' messages wait in their pipes meanwhile
                        meanwhile()
                        meanwhile = None
                    if not running:
                        break
                    for reader in wait(list(running)):
                        got = self._receive(reader, running, show)  # always: it also reaps an ended worker
                        failure = failure or got
            except BaseException:  # Ctrl-C, or a bug here: no worker outlives the lab
                for p in running.values():
                    p.terminate()
                    p.join()
                raise
        if failure is not None:
            kind, msg = failure
            if kind == "error":
                raise VocabdriftError(msg)
            raise RuntimeError(f"a lab stage failed in its worker process:\n{msg}")

    def _start_worker(self, ctx: Any, chain: list[Stage], note: str) -> tuple[Any, Any]:
        """Fork a worker for `chain`; (the reading end of its pipe, the process)."""
        import warnings

        reader, writer = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_chain_worker, args=(chain, writer, self.progress == "lines"), daemon=True)
        self._say("[bold]→ " + ", then ".join(what for _, _, what in chain) + f" …[/bold] [dim]({note})[/dim]")
        with warnings.catch_warnings():  # Python 3.12+ warns on a fork with threads (torch's idle pool)
            warnings.simplefilter("ignore", DeprecationWarning)
            p.start()
        writer.close()  # the child's copy stays open: its end gives this reader EOF
        return reader, p

    def _receive(self, reader: Any, running: dict[Any, Any], show: Callable[[Any, str | None], None]
                 ) -> tuple[str, str] | None:
        """Handle one message from a worker (or its end); a failure as (kind, message), else None."""
        try:
            kind, *rest = reader.recv()
        except EOFError:  # the worker has ended
            show(reader, None)
            p = running.pop(reader)
            p.join()
            return None if p.exitcode == 0 else \
                ("error", f"a lab worker process died (exit code {p.exitcode}); rerun the same command to resume")
        if kind == "start":
            show(reader, rest[0])
        elif kind == "step":  # a training stage's step count: the live line shows it
            show(reader, None, steps=(rest[0], rest[1]))
        elif kind == "done":
            show(reader, None)
            self._finish(*rest)
        else:
            return kind, rest[0]
        return None

    def _finish(self, name: str, what: str, secs: float, update: dict[str, Any] | None) -> None:
        for k, v in (update or {}).items():
            if isinstance(v, dict):
                self.state.setdefault(k, {}).update(v)
            else:
                self.state[k] = v
        self.state["stages"][name] = {"seconds": round(secs, 2)}
        self.save()
        self._say(f"✓ {what} [dim]({secs:.1f} s)[/dim]")

    def _say(self, msg: str) -> None:
        from rich.text import Text

        if self.progress is True:
            from rich.console import Console

            (self._console or Console(stderr=True)).print(msg)
        elif self.progress == "lines":
            say(Text.from_markup(msg).plain)
        log.info(Text.from_markup(msg).plain)

    @contextlib.contextmanager
    def _board(self) -> Iterator[Callable[..., None]]:
        """While chains run side by side: a live line for each running stage with its time so far.

        Yields `show(key, what, steps=None)`: the line of `key` (a chain) now says `what`; None removes it. With
        `steps=(done, total)` (and `what` None) the line keeps its text and shows the steps. A no-op without
        progress. The workers draw nothing themselves: two live displays on one terminal would garble it.
        """
        if self.progress == "lines":
            yield _step_lines()
            return
        if not self.progress:
            yield lambda key, what, steps=None: None
            return
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        lines: dict[Any, Any] = {}
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.fields[steps]}"),
                      TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:

            def show(key: Any, what: str | None, steps: tuple[int, int] | None = None) -> None:
                if steps is not None:
                    if key in lines:
                        bar.update(lines[key], steps=f"[dim]step {steps[0]:,}/{steps[1]:,}[/dim]")
                    return
                if key in lines:
                    bar.remove_task(lines.pop(key))
                if what is not None:
                    lines[key] = bar.add_task(what, steps="")

            self._console = bar.console  # stage lines print above the live lines
            try:
                yield show
            finally:
                self._console = None


def _step_lines() -> Callable[..., None]:
    """`_board`'s `show` in a log: each running stage's steps as a line every `progress.LINE_EVERY` seconds (the
    stage's start and end are said by the runner)."""
    every = every_seconds()
    started: dict[Any, tuple[str, float, float]] = {}  # key -> (what, start, last line)

    def show(key: Any, what: str | None, steps: tuple[int, int] | None = None) -> None:
        now = time.perf_counter()
        if steps is None:
            started.pop(key, None)
            if what is not None:
                started[key] = (what, now, now)
            return
        if key in started and now - started[key][2] >= every:
            what, t0, _ = started[key]
            started[key] = (what, t0, now)
            say(f"  {what}: step {steps[0]:,}/{steps[1]:,} ({now - t0:.0f} s)")

    return show


# In a forked worker: sends a training stage's step count to the parent's live line (None elsewhere).
_step_sink: Callable[[int, int], None] | None = None


def steps_to_parent() -> Any:
    """A TrainerCallback that reports each optimizer step through `_step_sink` (a no-op outside a worker, where
    the SFT's own bar shows the steps)."""
    from transformers import TrainerCallback

    class StepsToParent(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if _step_sink is not None:
                _step_sink(state.global_step, state.max_steps)

    return StepsToParent()


def _chain_worker(chain: list[Stage], conn: Any, lines: bool = False) -> None:
    """A forked worker: one thread, no progress bars; each finished stage is sent to the parent. With `lines` (the
    parent writes to a log) its stages write their own progress lines (probe, confusion): a line is one write, so
    two workers' lines do not mix within a line."""
    import traceback

    global _step_sink
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the parent's Rust thread pool did not come with the fork
    _step_sink = lambda done, total: conn.send(("step", done, total))  # noqa: E731
    if "torch" in sys.modules:  # a worker forked before torch was imported (corpus, tokenizer) does not need it
        sys.modules["torch"].set_num_threads(1)
    code = 0
    try:
        for name, fn, what in chain:
            conn.send(("start", what))
            set_prefix(f"  {what.split(':')[0]}: ")  # "  baseline: probing: 62/248 ..."
            t = time.perf_counter()
            update = fn("lines" if lines else False)
            conn.send(("done", name, what, time.perf_counter() - t, update))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent says it, once
        code = 130
    except VocabdriftError as e:
        conn.send(("error", str(e)))
        code = 2
    except Exception:
        conn.send(("crash", traceback.format_exc()))
        code = 1
    with contextlib.suppress(OSError):
        conn.close()
    sys.exit(code)  # multiprocessing turns it into the exit code, skipping the parent's exit handlers
