"""`lab`: the whole investigation on a tiny model, offline, on a CPU — drift appears, is explained, and is repaired.

Stages (each cached in OUT, so a rerun resumes where the last one stopped):

    corpus     OUT/data/pretrain.jsonl, sft.jsonl           (faker + wordfreq, six languages, a planted name)
    tokenizer  OUT/models/tokenizer                          (byte-level BPE; 嘉祺 is one token)
    base       OUT/models/base                               (a tiny Llama pre-trained from scratch)
    synth      OUT/data/coverage.jsonl                       (the full-vocabulary coverage set)
    baseline   OUT/models/baseline                           (SFT on sft.jsonl)
    repaired   OUT/models/repaired                           (SFT on sft.jsonl + coverage.jsonl)
    analyses   OUT/baseline, OUT/repaired                    (normal run folders: diff, coverage, probe, ...)
    compare    OUT/lab.json, OUT/lab.md                      (the measured table)
    remedies   OUT/remedies/{replay,anchor,gate}, remedies.md (`repair` runs beside baseline and +coverage;
                                                             default on, off with --quick)

Pre-training runs on two CPU threads on every machine that has two. From the SFTs on, every stage runs on one
thread, and two independent chains of stages (baseline | repaired; then the remedies) run side by side in forked
processes: the models are so small that this does more work per second than two threads on one chain
(`_Stages.run_side_by_side`). Fixing the thread counts makes the numbers the same whether the chains are forked or
not, and on any core count from two up.

Every model folder is a normal Hugging Face checkpoint and every run folder a normal vocabdrift run, so each other
command works on them (`vocabdrift report OUT/baseline`, `vocabdrift neighbors OUT/models/baseline 嘉祺`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..device import cpu_threads, usable_cpus
from ..errors import VocabdriftError
from .corpus import GIVEN_NAME, build_corpus

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

THRESHOLD = 0.95
SCARCE = ("japanese", "hangul", "cyrillic", "arabic")  # languages the SFT set (nearly) never answers in
REMEDIES = ("replay", "anchor", "gate")  # trained with `repair` beside the baseline and +coverage
HELDOUT = 200  # held-out SFT conversations for each model's task loss
PRETRAIN_THREADS = 2  # pre-training's CPU threads on every machine (see `lab`)
PROBE_TOP_P = 0.25  # a tight nucleus: a tiny model's next-token distribution is flat (see _probe)
JA_PROMPTS = ("お年玉について短い文章を書いてください。", "富士山について教えてください。")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the lab's numbers (besides the seed); stored in OUT/lab.json to guard the cache."""

    docs: int               # pre-training documents
    sft_samples: int        # SFT conversations (before the coverage set)
    name_every: int         # one pre-training document in this many is about the planted name
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    context: int            # pre-training window
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    sft_steps: int
    sft_batch: int
    sft_lr: float
    sft_beta2: float        # AdamW's second-moment decay in SFT
    min_per_token: int      # coverage set: verified placements per token
    tokens_per_sample: int
    probe_top: int          # probe the planted token plus this many of the baseline's most drifted
    confusion_n: int
    replay_ratio: float = 0.2   # +replay: share of SFT samples that are pre-training text
    anchor: float = 0.1         # +anchor: λ of the L2-SP anchor on lm_head
    seed: int = 0               # the seed `lab` uses unless given one: the README's tables were measured at it


# SFT uses AdamW with beta2 0.95: with 0.999 one large gradient on a row (the planted name predicted in some SFT
# context) inflates its second moment for hundreds of steps and damps that row's later drift, which then depends
# on chance more than on how rare the token is in the SFT data.
# Pre-training sees 700 batches of 8 windows of 64 tokens (the 90-second goal of --quick; 1,200 batches before,
# 2,400 of 16 windows before that). The language pattern holds at every seed tried; the planted name's full story
# (among the 10% most drifted rows, lost by the baseline, said again after the repair) depends on chance at this
# size and holds at seed 5, the recipe's seed (README: which seeds do what).
QUICK = Recipe(docs=2500, sft_samples=600, name_every=400, vocab_size=2048, hidden=64, layers=2, heads=4,
               context=64, pretrain_steps=700, pretrain_batch=8, pretrain_lr=5e-3, sft_steps=200, sft_batch=8,
               sft_lr=5e-4, sft_beta2=0.95, min_per_token=2, tokens_per_sample=8, probe_top=30, confusion_n=20,
               seed=5)
# The default trains the quick recipe's models (so the tests' assertions hold for it) and adds the breadth: 100
# probed tokens, 100 confusion samples, the remedies. At this size the planted name's story reproduces; in LARGE
# (a 4,096-token model, ~11 min here) the language pattern does, the planted name does not (README).
DEFAULT = dataclasses.replace(QUICK, probe_top=100, confusion_n=100)
LARGE = Recipe(docs=5000, sft_samples=1500, name_every=400, vocab_size=4096, hidden=96, layers=3, heads=4,
               context=128, pretrain_steps=2000, pretrain_batch=16, pretrain_lr=3e-3, sft_steps=400, sft_batch=8,
               sft_lr=3e-4, sft_beta2=0.95, min_per_token=3, tokens_per_sample=8, probe_top=100, confusion_n=100)


# ---- stage bookkeeping ----------------------------------------------------------------------------------------

# A stage: (name, fn, what). fn(progress) does the work and may return updates for lab.json's state.
Stage = tuple[str, Callable[[bool], "dict[str, Any] | None"], str]


class _Stages:
    """OUT/lab.json: the recipe, the seed and the finished stages with their seconds; written atomically."""

    def __init__(self, out: Path, recipe: Recipe, seed: int, progress: bool) -> None:
        self.path = out / "lab.json"
        self.progress = progress
        want = {"recipe": asdict(recipe), "seed": seed}
        if self.path.exists():
            state = json.loads(self.path.read_text())
            if {k: state.get(k) for k in want} != want:
                raise VocabdriftError(f"{out} holds a lab run made with other settings (seed or recipe); pass "
                                      "another -o, or delete the folder")
        else:
            state = {**want, "stages": {}}
        self.state = state
        self._console: Any = None  # the live display's console while one is shown

    def save(self) -> None:
        tmp = self.path.with_name(".lab.json.tmp")
        tmp.write_text(json.dumps(self.state, indent=2, ensure_ascii=False, default=str))
        os.replace(tmp, self.path)

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
        p = ctx.Process(target=_chain_worker, args=(chain, writer), daemon=True)
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
        if self.progress:
            from rich.console import Console

            (self._console or Console(stderr=True)).print(msg)
        log.info(msg)

    @contextlib.contextmanager
    def _board(self) -> Iterator[Callable[..., None]]:
        """While chains run side by side: a live line for each running stage with its time so far.

        Yields `show(key, what, steps=None)`: the line of `key` (a chain) now says `what`; None removes it. With
        `steps=(done, total)` (and `what` None) the line keeps its text and shows the steps. A no-op without
        progress. The workers draw nothing themselves: two live displays on one terminal would garble it.
        """
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


# In a forked worker: sends a training stage's step count to the parent's live line (None elsewhere).
_step_sink: Callable[[int, int], None] | None = None


def _steps_to_parent() -> Any:
    """A TrainerCallback that reports each optimizer step through `_step_sink` (a no-op outside a worker, where
    the SFT's own bar shows the steps)."""
    from transformers import TrainerCallback

    class StepsToParent(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if _step_sink is not None:
                _step_sink(state.global_step, state.max_steps)

    return StepsToParent()


def _chain_worker(chain: list[Stage], conn: Any) -> None:
    """A forked worker: one thread, no progress bars; each finished stage is sent to the parent."""
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
            t = time.perf_counter()
            update = fn(False)
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


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- the measured comparison ----------------------------------------------------------------------------------

def _measure(run: Path, reach_ids: Any, planted: int) -> dict[str, Any]:
    """The lab's numbers for one run folder: the headline drift, per-language shares, the planted token's fate."""
    import numpy as np

    from ..outputs.run import Run

    r = Run(run)
    drift = r.read_table("drift.parquet")
    vocab = r.read_table("vocab.parquet")
    summary = r.read_json("summary.json")
    ids = drift.column("token_id").to_numpy()
    cos = drift.column("lm_head_cos").to_numpy()
    emb = drift.column("embed_cos").to_numpy()
    special = vocab.column("is_special").to_numpy(zero_copy_only=False)[ids]
    ok = ~special & np.isfinite(cos)
    order = np.argsort(cos[ok], kind="stable")
    rank = int(np.nonzero(ids[ok][order] == planted)[0][0]) + 1
    reach = np.zeros(vocab.num_rows, dtype=bool)
    reach[np.asarray(reach_ids, dtype=np.int64)] = True
    reached = ok & reach[ids]
    centered = drift.column("lm_head_cos_centered").to_numpy() if "lm_head_cos_centered" in drift.column_names \
        else None
    out = {
        "mean_cos": float(cos[ok].mean()), "min_cos": float(cos[ok].min()),
        "mean_cos_centered": float(np.nanmean(centered[ok])) if centered is not None else None,
        "min_cos_reachable": float(cos[reached].min()), "unreachable": int((ok & ~reach[ids]).sum()),
        "min_cos_unreachable": float(cos[ok & ~reach[ids]].min()) if (ok & ~reach[ids]).any() else None,
        "below": {"0.95": int((cos[ok] < 0.95).sum()), "0.90": int((cos[ok] < 0.90).sum()), "tokens": int(ok.sum())},
        "languages": {cat: {"tokens": v["lm_head"]["tokens"], "below_0.95": v["lm_head"]["below_0.95"]}
                      for cat, v in summary["categories"].items() if v["lm_head"]["tokens"]},
        "planted": {"token_id": planted, "lm_head_cos": float(cos[ids == planted][0]),
                    "embed_cos": float(emb[ids == planted][0]), "lm_head_rank": rank, "of": int(ok.sum()),
                    "embed_median_cos": float(np.median(emb[ok]))},
    }
    for key in ("probe", "cases", "confusion"):
        if key in summary:
            out[key] = summary[key]
    return out


def _share(m: dict[str, Any], cat: str) -> float:
    v = m["languages"].get(cat)
    return v["below_0.95"] / v["tokens"] if v and v["tokens"] else float("nan")


def comparison_markdown(results: dict[str, dict[str, Any]]) -> str:
    """The measured table, in the layout of DESIGN.md's reference table."""
    b, r = results["baseline"], results["repaired"]

    def pct(n: int, d: int) -> str:
        return f"{n:,} ({100 * n / max(d, 1):.1f}%)"

    rows = [
        ("lm_head cosine to pre-trained, mean / min",
         f"{b['mean_cos']:.4f} / {b['min_cos']:.4f}", f"{r['mean_cos']:.4f} / {r['min_cos']:.4f}"),
        *([("mean-centred lm_head cosine, mean", f"{b['mean_cos_centered']:.4f}", f"{r['mean_cos_centered']:.4f}")]
          if b["mean_cos_centered"] is not None and r["mean_cos_centered"] is not None else []),
        ("min over tokens the coverage set reaches (unreachable apart)",
         f"{b['min_cos_reachable']:.4f} ({b['unreachable']} unreachable)",
         f"{r['min_cos_reachable']:.4f} ({r['unreachable']} unreachable)"),
        ("tokens below 0.95 / 0.90",
         f"{pct(b['below']['0.95'], b['below']['tokens'])} / {pct(b['below']['0.90'], b['below']['tokens'])}",
         f"{pct(r['below']['0.95'], r['below']['tokens'])} / {pct(r['below']['0.90'], r['below']['tokens'])}"),
    ]
    for cat in ("japanese", "han", "hangul", "cyrillic", "arabic", "latin"):
        if cat in b["languages"]:
            vb, vr = b["languages"][cat], r["languages"][cat]
            rows.append((f"{cat} tokens below 0.95", f"{vb['below_0.95']:,} of {vb['tokens']:,} "
                         f"({100 * _share(b, cat):.1f}%)", f"{vr['below_0.95']:,} of {vr['tokens']:,} "
                         f"({100 * _share(r, cat):.1f}%)"))
    pb, pr = b["planted"], r["planted"]
    rows.append((f"planted token {GIVEN_NAME}: lm_head cos (rank) / embed cos",
                 f"{pb['lm_head_cos']:.4f} (#{pb['lm_head_rank']} of {pb['of']:,}) / {pb['embed_cos']:.4f}",
                 f"{pr['lm_head_cos']:.4f} (#{pr['lm_head_rank']} of {pr['of']:,}) / {pr['embed_cos']:.4f}"))
    if "probe" in b and "probe" in r:
        rows.append(("probe: tokens lost (sayable by base, not after SFT)",
                     f"{len(b['probe']['lost'])} of {b['probe']['tokens']}"
                     + (f", {GIVEN_NAME} lost" if pb["token_id"] in b["probe"]["lost"] else ""),
                     f"{len(r['probe']['lost'])} of {r['probe']['tokens']}"
                     + (f", {GIVEN_NAME} lost" if pr["token_id"] in r["probe"]["lost"] else "")))
    if "confusion" in b and "confusion" in r:
        rows.append(("Japanese prompt -> foreign-script characters", _confusion_cell(b), _confusion_cell(r)))
    if "cases" in b and "cases" in r:
        rows.append(("qualitative cases passed", _cases_cell(b), _cases_cell(r)))
    if "heldout_loss" in b and "heldout_loss" in r:
        rows.append((f"held-out SFT loss (base model: {b['heldout_loss_base']:.3f})", f"{b['heldout_loss']:.3f}",
                     f"{r['heldout_loss']:.3f}"))
    lines = ["| metric | baseline SFT | SFT + full-vocabulary coverage |", "| --- | --- | --- |"]
    lines += [f"| {a} | {x} | {y} |" for a, x, y in rows]
    return "\n".join(lines) + "\n"


def _costs(out: Path, remedy_runs: dict[str, Path]) -> dict[str, int]:
    """Extra training tokens of each way: the coverage set's, replay's; the anchor and the gate add none."""
    from ..outputs.run import Run
    from ..sources.tokenizer import load_tokenizer
    from .repair import count_tokens

    tok = load_tokenizer(out / "models" / "base")
    cost = {"baseline": 0, "+coverage": count_tokens(_read_jsonl(out / "data" / "coverage.jsonl"), tok)}
    for k, p in remedy_runs.items():
        cost[f"+{k}"] = int(Run(p).read_json("summary.json")["repair"]["cost"]["extra_tokens"])
    return cost


def remedies_markdown(results: dict[str, dict[str, Any]]) -> str:
    """One row per way of training: drift, per-language shares below 0.95, lost tokens, extra training tokens."""
    langs = [c for c in ("japanese", "hangul", "cyrillic", "arabic", "han", "latin")
             if c in results["baseline"]["languages"]]
    head = ["SFT", "lm_head cos mean", "min", "min (reachable)", *[f"{c} < 0.95" for c in langs],
            "probe: lost", "held-out SFT loss", "extra training tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, m in results.items():
        lost = m.get("probe", {}).get("lost", [])
        lost_cell = f"{len(lost)} of {m['probe']['tokens']}" + (f", {GIVEN_NAME} lost" if m["planted"]["token_id"]
                                                                  in lost else "") if "probe" in m else "-"
        cells = [name, f"{m['mean_cos']:.4f}", f"{m['min_cos']:.4f}", f"{m['min_cos_reachable']:.4f}",
                 *[f"{100 * _share(m, c):.1f}%" for c in langs], lost_cell,
                 f"{m['heldout_loss']:.3f}" if "heldout_loss" in m else "-", f"{m.get('extra_tokens', 0):,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _confusion_cell(m: dict[str, Any]) -> str:
    res = m["confusion"]["results"]
    hits, n = sum(r["hits"] for r in res), sum(r["n"] for r in res)
    return f"{hits}/{n} ({100 * hits / max(n, 1):.0f}%)"


def _cases_cell(m: dict[str, Any]) -> str:
    c = next(iter(m["cases"].values())) if "passed" not in m["cases"] else m["cases"]
    return f"{c['passed']}/{c['total']}"


# ---- the lab ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabResult:
    """Where the lab wrote things, and its measured comparison."""

    out: Path
    runs: dict[str, Path]
    models: dict[str, Path]
    results: dict[str, dict[str, Any]]
    table: str
    timings: dict[str, float]
    remedies: dict[str, dict[str, Any]] | None = None   # baseline, +coverage, +replay, +anchor, +gate
    remedies_table: str | None = None


def lab(out: PathLike, *, quick: bool = False, seed: int | None = None, progress: bool = True,
        recipe: Recipe | None = None, remedies: bool | None = None) -> LabResult:
    """Reproduce the investigation on a tiny model: pre-train, SFT twice (baseline, + coverage set), analyse both.

    Args:
        out: the lab folder (created; a rerun with the same settings resumes from the last finished stage).
        quick: the same models with fewer probed tokens and confusion samples and no remedies (for tests and a
            first look; 60-85 s on 2 cores).
        seed: all randomness (corpus, initialisation, data order) follows it (default: the recipe's own).
        recipe: another recipe, e.g. `LARGE` (`quick` is ignored then).
        remedies: also train +replay, +anchor and +gate with `repair` and compare all five ways in OUT/remedies.md
            (default: on, off with `quick`; turning it on later reuses every finished stage).

    Returns:
        a `LabResult`; OUT/lab.md holds the measured table, OUT/baseline and OUT/repaired are run folders.

    Example:
        >>> r = lab("runs/lab", quick=True)
        >>> print(r.table)
    """
    recipe = recipe or (QUICK if quick else DEFAULT)
    seed = recipe.seed if seed is None else seed
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VocabdriftError(f"{out} is a file; -o takes a folder for the lab")
    out.mkdir(parents=True, exist_ok=True)
    st = _Stages(out, recipe, seed, progress)
    data, models = out / "data", out / "models"
    runs = {"baseline": out / "baseline", "repaired": out / "repaired"}
    mpath = {k: models / k for k in ("tokenizer", "base", "baseline", "repaired")}
    remedy_runs = {k: out / "remedies" / k for k in REMEDIES}

    def corpus(progress: bool) -> None:
        c = build_corpus(docs=recipe.docs, sft=recipe.sft_samples, seed=seed, name_every=recipe.name_every)
        _write_jsonl(data / "pretrain.jsonl", [{"text": t} for t in c.pretrain])
        _write_jsonl(data / "sft.jsonl", c.sft)
        _write_jsonl(data / "heldout.jsonl", _heldout_records(seed))

    def pretrain_texts() -> list[str]:
        return [r["text"] for r in _read_jsonl(data / "pretrain.jsonl")]

    def tokenizer(progress: bool) -> None:
        from .train import train_tokenizer

        _rm_partial(mpath["tokenizer"])
        train_tokenizer(pretrain_texts(), vocab_size=recipe.vocab_size, out=mpath["tokenizer"],
                        must_have=[GIVEN_NAME])

    def base(progress: bool) -> dict[str, Any]:
        from ..sources.tokenizer import load_tokenizer
        from .train import pretrain

        _rm_partial(mpath["base"])
        _, loss = pretrain(load_tokenizer(mpath["tokenizer"]), pretrain_texts(), out=mpath["base"],
                           steps=recipe.pretrain_steps, hidden=recipe.hidden, layers=recipe.layers,
                           heads=recipe.heads, context=recipe.context, batch_size=recipe.pretrain_batch,
                           lr=recipe.pretrain_lr, seed=seed, progress=progress)
        return {"pretrain_loss": round(loss, 4)}

    def synth_set(progress: bool) -> None:
        from ..api.coverage import synth

        synth(mpath["tokenizer"], out=data / "coverage.jsonl", min_per_token=recipe.min_per_token,
              tokens_per_sample=recipe.tokens_per_sample, seed=seed, progress=progress)

    def train(name: str, files: list[Path]) -> Callable[[bool], None]:
        def go(progress: bool) -> None:
            from .train import sft

            _rm_partial(mpath[name])
            records = [r for f in files for r in _read_jsonl(f)]
            sft(mpath["base"], records, out=mpath[name], steps=recipe.sft_steps, lr=recipe.sft_lr,
                betas=(0.9, recipe.sft_beta2), batch_size=recipe.sft_batch, seed=seed, progress=progress,
                callbacks=[_steps_to_parent()])
        return go

    def analyse(name: str, files: list[Path]) -> Callable[[bool], None]:
        def go(progress: bool) -> None:
            from ..api.coverage import coverage
            from ..api.diff import diff

            diff(mpath["base"], mpath[name], out=runs[name], center=True, neighbors_of=[GIVEN_NAME],
                 progress=progress)
            coverage([str(f) for f in files], tokenizer=mpath["base"], out=runs[name], progress=progress)
        return go

    def _probe(model: Path, run: Path, progress: bool) -> None:
        from ..analyses.probe import CHAT_DEFAULT, FEWSHOT_DEFAULT
        from ..api.probe import probe

        # The base model never saw the chat format: probe it few-shot, in pre-training style; the SFT model
        # both ways (a token is sayable when any prompt gets it said). Top-p 0.25, not 0.95: a tiny model's
        # next-token distribution is so flat that a 0.95 nucleus holds hundreds of tokens.
        probe(model, base=mpath["base"], tokens=_probe_tokens(), out=run, base_templates=list(FEWSHOT_DEFAULT),
              templates=[*FEWSHOT_DEFAULT, *CHAT_DEFAULT], top_p=PROBE_TOP_P, progress=progress)

    def prove(name: str) -> Callable[[bool], None]:
        def go(progress: bool) -> None:
            from ..api.probe import cases, confusion

            _probe(mpath[name], runs[name], progress)
            cases(mpath[name], out=runs[name], name=name, progress=progress)  # the published cases
            confusion(mpath[name], prompts=list(JA_PROMPTS), language="ja", n=recipe.confusion_n, seed=seed,
                      max_tokens=48, out=runs[name], progress=progress)
        return go

    def _probe_tokens() -> list[int]:
        from ..analyses.drift import most_drifted
        from ..outputs.run import Run

        r = Run(runs["baseline"])
        top = most_drifted(r.read_table("drift.parquet"), r.read_table("vocab.parquet"), recipe.probe_top)
        return list(dict.fromkeys([_planted_id(), *top.column("token_id").to_pylist()]))

    def _planted_id() -> int:
        from ..sources.tokenizer import load_tokenizer

        ids = load_tokenizer(mpath["base"]).backend_tokenizer.encode(GIVEN_NAME, add_special_tokens=False).ids
        return ids[0]

    @functools.cache
    def heldout_records() -> list[dict[str, Any]]:  # written with the corpus (folders from before: made here)
        f = data / "heldout.jsonl"
        return _read_jsonl(f) if f.exists() else _heldout_records(seed)

    def heldout(name: str, model: Path) -> Stage:
        def go(progress: bool) -> dict[str, Any]:
            from .train import eval_loss

            return {"heldout_loss": {name: round(eval_loss(model, heldout_records()), 6)}}
        return f"heldout_{name}", go, f"held-out SFT loss: {name}"

    def remedy(name: str) -> Stage:
        def go(progress: bool) -> None:
            from .repair import repair

            _rm_partial(remedy_runs[name])
            repair(mpath["base"], data / "sft.jsonl", out=remedy_runs[name], coverage=None,
                   replay=data / "pretrain.jsonl" if name == "replay" else None,
                   replay_ratio=recipe.replay_ratio if name == "replay" else 0.0,
                   anchor=recipe.anchor if name == "anchor" else 0.0, gate=name == "gate",
                   steps=recipe.sft_steps, lr=recipe.sft_lr, batch_size=recipe.sft_batch, seed=seed,
                   betas=(0.9, recipe.sft_beta2), progress=progress, callbacks=[_steps_to_parent()])
            _probe(remedy_runs[name] / "model", remedy_runs[name], progress)
        return f"remedy_{name}", go, f"SFT +{name} (repair), diff and probe"

    def write_report(progress: bool) -> None:
        from ..outputs.report import report

        report(runs["baseline"], compare=runs["repaired"], names="baseline,repaired", tokens=[GIVEN_NAME])

    sft_files = [data / "sft.jsonl"]
    rep_files = [data / "sft.jsonl", data / "coverage.jsonl"]
    st.run_beside([("corpus", corpus, "corpus: pre-training text and SFT conversations"),
                   ("tokenizer", tokenizer, f"tokenizer: byte-level BPE, {recipe.vocab_size:,} tokens")],
                  meanwhile=_import_for_later_stages)
    import torch

    torch.manual_seed(seed)
    # two threads whatever the machine: the recipe's seed was chosen on them, and the thread count changes the
    # floating-point sums, hence the trained model (one CPU gets one thread: two would wait on each other)
    st.run(("base", base, f"pre-training a tiny Llama ({recipe.pretrain_steps} steps)"),
           threads=min(PRETRAIN_THREADS, usable_cpus()))
    # From here on every stage runs on one thread, two independent chains side by side (`run_side_by_side`).
    st.run_side_by_side([
        [("baseline", train("baseline", sft_files), f"SFT baseline ({recipe.sft_steps} steps)"),
         ("analyse_baseline", analyse("baseline", sft_files), "baseline: diff and coverage"),
         heldout("baseline", mpath["baseline"])],
        [("synth", synth_set, "coverage set (synth)"),
         ("repaired", train("repaired", rep_files), f"SFT + coverage set ({recipe.sft_steps} steps)"),
         ("analyse_repaired", analyse("repaired", rep_files), "repaired: diff and coverage"),
         heldout("repaired", mpath["repaired"])]])
    st.run_side_by_side([  # both probe the baseline's most drifted tokens: after both analyses
        [("prove_baseline", prove("baseline"), "baseline: probe, cases, confusion on Japanese prompts"),
         heldout("base", mpath["base"])],
        [("prove_repaired", prove("repaired"), "repaired: probe, cases, confusion on Japanese prompts")]])
    st.run(("report", write_report, "report: baseline against repaired"))
    if remedies if remedies is not None else not quick:
        st.run_side_by_side([[remedy(k), heldout(f"+{k}", p / "model")] for k, p in remedy_runs.items()])

    import pyarrow.parquet as pq

    planted = _planted_id()
    cov = pq.read_table(runs["repaired"] / "coverage.parquet")
    reach_ids = cov.filter(cov.column("count").to_numpy() > 0).column("token_id").to_numpy()
    remedied = all(st.done(f"remedy_{k}") for k in REMEDIES)
    losses = st.state["heldout_loss"]
    results = {k: _measure(p, reach_ids, planted) for k, p in runs.items()}
    for k, v in results.items():
        v.update(heldout_loss=losses[k], heldout_loss_base=losses["base"])
    table = comparison_markdown(results)
    st.state["results"] = results
    st.save()
    _write_text(out / "lab.md", table)
    rem_results, rem_table = None, None
    if remedied:
        rem_results = {"baseline": dict(results["baseline"]), "+coverage": dict(results["repaired"]),
                       **{f"+{k}": _measure(p, reach_ids, planted) for k, p in remedy_runs.items()}}
        for k in REMEDIES:
            rem_results[f"+{k}"].update(heldout_loss=losses[f"+{k}"], heldout_loss_base=losses["base"])
        cost = _costs(out, remedy_runs)
        for k, v in rem_results.items():
            v["extra_tokens"] = cost[k]
        rem_table = remedies_markdown(rem_results)
        st.state["remedies"] = rem_results
        st.save()
        _write_text(out / "remedies.md", rem_table)
    timings = {k: v["seconds"] for k, v in st.state["stages"].items()}
    return LabResult(out=out, runs=runs, models={k: v for k, v in mpath.items() if k != "tokenizer"},
                     results=results, table=table, timings=timings, remedies=rem_results, remedies_table=rem_table)


def _import_for_later_stages() -> None:
    """What pre-training and SFT import (torch, transformers' Llama, TRL's trainer, datasets): seconds, spent while
    a worker builds the corpus and the tokenizer; the workers forked later inherit them."""
    import datasets  # noqa: F401
    import torch  # noqa: F401
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401


def _heldout_records(seed: int) -> list[dict[str, Any]]:
    """SFT conversations none of the models trained on (same mix, another seed, no Japanese or name): each model's
    loss on them says what a way of training cost the SFT task itself."""
    from .corpus import sft_records

    return sft_records(HELDOUT, seed=seed + 1_000_003, japanese=0, name=0)


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file, so a table is never seen half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _rm_partial(path: Path) -> None:
    """A stage killed after its rename but before lab.json recorded it leaves a finished folder: start it over."""
    import shutil

    if path.exists():
        shutil.rmtree(path)


__all__ = ["DEFAULT", "LARGE", "QUICK", "REMEDIES", "LabResult", "Recipe", "comparison_markdown", "lab",
           "remedies_markdown"]
