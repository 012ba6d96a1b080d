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
    remedies   OUT/remedies/{replay,anchor,gate,coverage5}, remedies.md (`repair` runs beside baseline and
                                                             +coverage; default on, off with --quick)

Pre-training runs on two CPU threads on every machine that has two. From the SFTs on, every stage runs on one
thread, and two independent chains of stages (baseline | repaired; then the remedies) run side by side in forked
processes: the models are so small that this does more work per second than two threads on one chain
(`composites.stages.StageRunner.run_side_by_side`). Fixing the thread counts makes the numbers the same whether the
chains are forked or not, and on any core count from two up.

The stages are module-level functions over one context (`_Lab`: the folder, the recipe, the seed), and `lab()` lists
them in the order they run; `_compare` then measures the finished run folders into the tables.

Every model folder is a normal Hugging Face checkpoint and every run folder a normal vocabdrift run, so each other
command works on them (`vocabdrift report OUT/baseline`, `vocabdrift neighbors OUT/models/baseline 嘉祺`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_bytes_atomic, write_lines_atomic
from ..device import usable_cpus
from ..errors import need_extra
from ..outputs import run as R
from ..progress import Mode
from .corpus import GIVEN_NAME, build_corpus
from .stages import Stage, StageRunner, steps_to_parent
from .train import TRAINING

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

THRESHOLD = 0.95
SCARCE = ("japanese", "hangul", "cyrillic", "arabic")  # languages whose tokens the SFT set rarely or never targets
# trained with `repair` beside the baseline and +coverage; coverage5: the same coverage set at 5% of the samples
REMEDIES = ("replay", "anchor", "gate", "coverage5")
HELDOUT = 200  # held-out SFT conversations for each model's task loss
PRETRAIN_THREADS = 2  # pre-training's CPU threads on every machine (see `lab`)
# what the lab needs beyond the core (the corpus, training, the report): pip install 'vocabdrift[lab]'
LAB_PACKAGES = ("faker", "wordfreq", *TRAINING, "plotly", "matplotlib")
PROBE_TOP_P = 0.25  # a tight nucleus: a tiny model's next-token distribution is flat (see _probe)
CONFUSION_TOKENS = 48  # tokens per sampled answer (the published prompts: two Japanese, one Korean; T=1.0)


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
    coverage_share: float = 0.05  # +coverage5: the coverage set's share of the SFT samples
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


# ---- stage bookkeeping (the runner is composites.stages) -------------------------------------------------------

class _Stages(StageRunner):
    """OUT/lab.json: the recipe, the seed and the finished stages with their seconds."""

    def __init__(self, out: Path, recipe: Recipe, seed: int, progress: Mode) -> None:
        super().__init__(out / R.LAB_STATE, {"recipe": asdict(recipe), "seed": seed}, progress,
                         mismatch=f"{out} holds a lab run made with other settings (seed or recipe); pass another "
                              "-o, or delete the folder")


_steps_to_parent = steps_to_parent  # each training stage's step count, to the live line


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_lines_atomic(path, (json.dumps(r, ensure_ascii=False) for r in rows))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- the measured comparison ----------------------------------------------------------------------------------

def _measure(run: Path, reach_ids: Any, planted: int) -> dict[str, Any]:
    """The lab's numbers for one run folder: the headline drift, per-language shares, the planted token's fate."""
    import numpy as np

    from ..analyses.drift import most_drifted_ids
    from ..outputs.run import Run

    r = Run(run)
    drift = r.read_table(R.DRIFT)
    vocab = r.read_table(R.VOCAB)
    summary = r.read_json(R.SUMMARY)
    ids = drift.column("token_id").to_numpy()
    cos = drift.column("lm_head_cos").to_numpy()
    emb = drift.column("embed_cos").to_numpy()
    special = vocab.column("is_special").to_numpy(zero_copy_only=False)[ids]
    ok = ~special & np.isfinite(cos)
    rank = most_drifted_ids(drift, vocab).index(planted) + 1
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
        "embed_min_cos": float(np.nanmin(emb[ok])) if ok.any() else None,
        "planted": {"token_id": planted, "lm_head_cos": float(cos[ids == planted][0]),
                    "embed_cos": float(emb[ids == planted][0]), "lm_head_rank": rank, "of": int(ok.sum()),
                    "embed_median_cos": float(np.median(emb[ok]))},
    }
    for key in ("probe", "cases", "confusion"):
        if key in summary:
            out[key] = summary[key]
    return out


def lab_verdict(results: dict[str, dict[str, Any]], *, alpha: float = 0.05) -> list[str]:
    """What the lab found, in sentences: what reproduced, what the repair did, where the repaired model is worse
    than the baseline (REGRESSION), and which measurements carry no signal. Empty when the measurements are
    missing (a folder measured by an older version)."""
    b, r = results.get("baseline") or {}, results.get("repaired") or {}
    if "below" not in b or "below" not in r or "planted" not in b:
        return []
    lines = []
    tb, tr = b["below"]["tokens"], r["below"]["tokens"]
    worst = max((c for c in b["languages"] if b["languages"][c]["tokens"] >= 5), key=lambda c: _share(b, c),
                default=None)
    share = 100 * b["below"]["0.95"] / max(tb, 1)
    lines.append(f"Drift reproduced: after SFT {b['below']['0.95']:,} of {tb:,} lm_head rows ({share:.1f}%) "
                 "fell below 0.95" + (f", {worst} worst ({100 * _share(b, worst):.1f}%)" if worst else "")
                 + f"; the coverage repair leaves {r['below']['0.95']:,} of {tr:,}.")
    pb, pr = b["planted"], r["planted"]
    if "probe" in b and "probe" in r:
        lost_b, lost_r = pb["token_id"] in b["probe"]["lost"], pr["token_id"] in r["probe"]["lost"]
        lines.append(f"The planted name {GIVEN_NAME}: " + ("lost after SFT" if lost_b else "not lost after SFT")
                     + (", lost after the repair too." if lost_r else ", sayable after the repair."))
        head_b, head_r = (b["probe"].get("headline") or {}).get("tokens"), (r["probe"].get("headline") or {}
                                                                           ).get("tokens")
        if head_b and head_r and not any(h["top1"][k] for h in (head_b, head_r) for k in ("base", "post")):
            lines.append("No signal: the probe's top-1 answers are 0 in every model (read its nucleus counts).")
    if "cases" in b and "cases" in r:
        cb, cr = _cases_cell(b), _cases_cell(r)
        if cb == cr and cb.startswith("0/"):
            lines.append(f"No signal: the qualitative cases pass {cb} for both models.")
    regress: list[str] = []
    worse: list[str] = []
    lb, lr = b.get("heldout_loss"), r.get("heldout_loss")
    if lb is not None and lr is not None and lr > lb:
        regress.append(f"held-out SFT loss {b['heldout_loss']:.3f} -> {r['heldout_loss']:.3f} "
                       f"({100 * (r['heldout_loss'] / b['heldout_loss'] - 1):+.1f}%)")
    if b.get("embed_min_cos") is not None and r.get("embed_min_cos") is not None \
            and r["embed_min_cos"] < b["embed_min_cos"] - 0.05:
        regress.append(f"minimum embedding cosine {b['embed_min_cos']:.3f} -> {r['embed_min_cos']:.3f}")
    if "confusion" in b and "confusion" in r:
        rb, rr = _confusion_results(b), _confusion_results(r)
        for key, x in rb.items():
            y = rr.get(key)
            if y is not None and y["rate"] > x["rate"]:
                p = _fisher(y, x)
                what = (f"language confusion on {_prompt_label(x)} {100 * x['rate']:.0f}% -> "
                        f"{100 * y['rate']:.0f}% (Fisher p {_p(p)})")
                (regress if p < alpha else worse).append(what)
    for x in regress:
        lines.append(f"REGRESSION of the repaired model: {x}.")
    for x in worse:
        lines.append(f"Worse, not significantly: {x}.")
    if not regress and not worse:
        lines.append("No regression of the repaired model on held-out loss, embeddings or confusion.")
    return lines


def _share(m: dict[str, Any], cat: str) -> float:
    v = m["languages"].get(cat)
    return v["below_0.95"] / v["tokens"] if v and v["tokens"] else float("nan")


def comparison_markdown(results: dict[str, dict[str, Any]]) -> str:
    """The measured table, in the layout of the reference table of docs/ARCHITECTURE.md."""
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
        rb, rr = _confusion_results(b), _confusion_results(r)
        for key, x in rb.items():
            if key in rr:
                y = rr[key]
                rows.append((f"{_prompt_label(x)}: answers with foreign letters (T=1.0)", _confusion_cell(x),
                             _confusion_cell(y) + f", Fisher p {_p(_fisher(y, x))}"))
        rows.append(("answers to the Japanese prompts mostly in kana/kanji", _native_cell(b, "ja"),
                     _native_cell(r, "ja")))
    if "cases" in b and "cases" in r:
        rows.append(("qualitative cases passed", _cases_cell(b), _cases_cell(r)))
    if "heldout_loss" in b and "heldout_loss" in r:
        rows.append((f"held-out SFT loss (base model: {b['heldout_loss_base']:.3f})", f"{b['heldout_loss']:.3f}",
                     f"{r['heldout_loss']:.3f}"))
    lines = ["| metric | baseline SFT | SFT + full-vocabulary coverage |", "| --- | --- | --- |"]
    lines += [f"| {a} | {x} | {y} |" for a, x, y in rows]
    return "\n".join(lines) + "\n"


def _costs(lb: _Lab, remedy_runs: dict[str, Path]) -> dict[str, int]:
    """Extra target tokens each way drew (as `repair` counts them: the added records' target tokens times the
    passes the steps make over the data): the coverage set's, replay's; the anchor and the gate add none."""
    from ..outputs.run import Run
    from ..sources.tokenizer import load_tokenizer
    from .repair import count_tokens

    tok = load_tokenizer(lb.mpath["base"])
    cov = _read_jsonl(lb.data / "coverage.jsonl")
    passes = lb.recipe.sft_steps * lb.recipe.sft_batch / max(1, len(_read_jsonl(lb.data / "sft.jsonl")) + len(cov))
    cost = {"baseline": 0, "+coverage": round(count_tokens(cov, tok) * passes)}
    for k, p in remedy_runs.items():
        cost[f"+{k}"] = int(Run(p).read_json(R.SUMMARY)["repair"]["cost"]["extra_tokens"])
    return cost


def remedies_markdown(results: dict[str, dict[str, Any]]) -> str:
    """One row per way of training: drift, per-language shares below 0.95, lost tokens, extra training tokens."""
    langs = [c for c in ("japanese", "hangul", "cyrillic", "arabic", "han", "latin")
             if c in results["baseline"]["languages"]]
    head = ["SFT", "lm_head cos mean", "min", "min (reachable)", *[f"{c} < 0.95" for c in langs],
            "probe: lost", "held-out SFT loss", "extra target tokens drawn"]
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


def _confusion_results(m: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(language, prompt) -> that prompt's confusion result, in the order sampled."""
    return {(x["language"], x["prompt"]): x for x in m.get("confusion", {}).get("results", [])}


def _prompt_label(x: dict[str, Any]) -> str:
    return f"{x.get('name') or x['language']} ({x['prompt'][:14]}…)"


def _confusion_cell(x: dict[str, Any]) -> str:
    """hits/n (rate, Wilson 95% interval; the most frequent foreign scripts)."""
    scripts = ", ".join(f"{k} {v}" for k, v in list((x.get("by_script") or {}).items())[:3])
    return (f"{x['hits']}/{x['n']} ({100 * x['rate']:.0f}%, {100 * x['ci_low']:.0f}-{100 * x['ci_high']:.0f}%"
            + (f"; {scripts}" if scripts else "") + ")")


def _fisher(x: dict[str, Any], ref: dict[str, Any]) -> float:
    from ..analyses.confusion import fisher_test

    return fisher_test(x["hits"], x["n"], ref["hits"], ref["n"])[1]


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def _native_cell(m: dict[str, Any], language: str) -> str:
    res = [x for x in _confusion_results(m).values() if x["language"] == language and "native" in x]
    if not res:
        return "-"
    k, n = sum(x["native"] for x in res), sum(x["n"] for x in res)
    return f"{k}/{n} ({100 * k / max(n, 1):.0f}%)"


def confusion_markdown(results: dict[str, dict[str, Any]]) -> str:
    """The published confusion measurement per prompt and model: the rate with its Wilson 95% interval, the answers
    per foreign script, the share of answers mostly in the prompt's own script, and Fisher's exact test (two-sided)
    against the first model (the baseline)."""
    models = [k for k, m in results.items() if "confusion" in m]
    if not models:
        return ""
    ref = _confusion_results(results[models[0]])
    head = ["prompt", "SFT", "answers with foreign letters", "95% interval", "answers per foreign script",
            "mostly in the prompt's script", f"Fisher p vs {models[0]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, x0 in ref.items():
        for name in models:
            x = _confusion_results(results[name]).get(key)
            if x is None:
                continue
            scripts = ", ".join(f"{k} {v}" for k, v in (x.get("by_script") or {}).items()) or "-"
            native = f"{x['native']}/{x['n']}" if "native" in x else "-"
            p = "" if name == models[0] else _p(_fisher(x, x0))
            lines.append(f"| {_prompt_label(x)} | {name} | {x['hits']}/{x['n']} ({100 * x['rate']:.0f}%) | "
                         f"{100 * x['ci_low']:.0f}-{100 * x['ci_high']:.0f}% | {scripts} | {native} | {p} |")
    return "\n".join(lines) + "\n"


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
    verdict: list[str] = field(default_factory=list)  # lab_verdict: what reproduced, regressions, no-signal rows


# ---- the lab's stages: module-level functions over one context, in the order they run -------------------------

@dataclass(frozen=True)
class _Lab:
    """Where a lab run keeps everything, and what decides its numbers: every stage reads only this."""

    out: Path
    recipe: Recipe
    seed: int

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def runs(self) -> dict[str, Path]:
        return {"baseline": self.out / "baseline", "repaired": self.out / "repaired"}

    @property
    def mpath(self) -> dict[str, Path]:
        return {k: self.out / "models" / k for k in ("tokenizer", "base", "baseline", "repaired")}

    @property
    def remedy_runs(self) -> dict[str, Path]:
        return {k: self.out / "remedies" / k for k in REMEDIES}

    @property
    def sft_files(self) -> list[Path]:
        return [self.data / "sft.jsonl"]

    @property
    def repaired_files(self) -> list[Path]:
        return [self.data / "sft.jsonl", self.data / "coverage.jsonl"]

    def pretrain_texts(self) -> list[str]:
        return [r["text"] for r in _read_jsonl(self.data / "pretrain.jsonl")]


def _corpus(lb: _Lab, progress: Mode) -> None:
    c = build_corpus(docs=lb.recipe.docs, sft=lb.recipe.sft_samples, seed=lb.seed, name_every=lb.recipe.name_every)
    _write_jsonl(lb.data / "pretrain.jsonl", [{"text": t} for t in c.pretrain])
    _write_jsonl(lb.data / "sft.jsonl", c.sft)
    _write_jsonl(lb.data / "heldout.jsonl", _heldout_records(lb.seed))


def _tokenizer(lb: _Lab, progress: Mode) -> None:
    from .train import train_tokenizer

    _rm_partial(lb.mpath["tokenizer"])
    train_tokenizer(lb.pretrain_texts(), vocab_size=lb.recipe.vocab_size, out=lb.mpath["tokenizer"],
                    must_have=[GIVEN_NAME])


def _base(lb: _Lab, progress: Mode) -> dict[str, Any]:
    from ..sources.tokenizer import load_tokenizer
    from .train import pretrain

    r = lb.recipe
    _rm_partial(lb.mpath["base"])
    _, loss = pretrain(load_tokenizer(lb.mpath["tokenizer"]), lb.pretrain_texts(), out=lb.mpath["base"],
                       steps=r.pretrain_steps, hidden=r.hidden, layers=r.layers, heads=r.heads, context=r.context,
                       batch_size=r.pretrain_batch, lr=r.pretrain_lr, seed=lb.seed, progress=progress)
    return {"pretrain_loss": round(loss, 4)}


def _synth_set(lb: _Lab, progress: Mode) -> None:
    from ..api.coverage import synth

    synth(lb.mpath["tokenizer"], out=lb.data / "coverage.jsonl", min_per_token=lb.recipe.min_per_token,
          tokens_per_sample=lb.recipe.tokens_per_sample, seed=lb.seed, progress=progress)


def _train(lb: _Lab, name: str, files: list[Path], progress: Mode) -> None:
    from .train import sft

    r = lb.recipe
    _rm_partial(lb.mpath[name])
    records = [rec for f in files for rec in _read_jsonl(f)]
    sft(lb.mpath["base"], records, out=lb.mpath[name], steps=r.sft_steps, lr=r.sft_lr, betas=(0.9, r.sft_beta2),
        batch_size=r.sft_batch, seed=lb.seed, progress=progress, callbacks=[_steps_to_parent()])


def _analyse(lb: _Lab, name: str, files: list[Path], progress: Mode) -> None:
    from ..api.coverage import coverage
    from ..api.diff import diff

    diff(lb.mpath["base"], lb.mpath[name], out=lb.runs[name], center=True, neighbors_of=[GIVEN_NAME],
         progress=progress)
    coverage([str(f) for f in files], tokenizer=lb.mpath["base"], out=lb.runs[name], progress=progress)


def _planted_id(lb: _Lab) -> int:
    from ..sources.tokenizer import load_tokenizer

    ids = load_tokenizer(lb.mpath["base"]).backend_tokenizer.encode(GIVEN_NAME, add_special_tokens=False).ids
    return ids[0]


def _probe_tokens(lb: _Lab) -> list[int]:
    """The planted token and the baseline's most drifted ones: every model is probed on the same tokens."""
    from ..analyses.drift import most_drifted

    r = R.Run(lb.runs["baseline"])
    top = most_drifted(r.read_table(R.DRIFT), r.read_table(R.VOCAB), lb.recipe.probe_top)
    return list(dict.fromkeys([_planted_id(lb), *top.column("token_id").to_pylist()]))


def _probe(lb: _Lab, model: Path, run: Path, progress: Mode) -> None:
    from ..analyses.probe import CHAT_DEFAULT, FEWSHOT_DEFAULT
    from ..api.probe import probe

    # The base model never saw the chat format: probe it few-shot, in pre-training style; the SFT model
    # both ways (a token is sayable when any prompt gets it said). Top-p 0.25, not 0.95: a tiny model's
    # next-token distribution is so flat that a 0.95 nucleus holds hundreds of tokens. No control set: the lab's
    # tables compare its own chosen tokens (drifted and undrifted), and the quick run has a time budget.
    probe(model, base=lb.mpath["base"], tokens=_probe_tokens(lb), out=run, base_templates=list(FEWSHOT_DEFAULT),
          templates=[*FEWSHOT_DEFAULT, *CHAT_DEFAULT], top_p=PROBE_TOP_P, progress=progress, control=0)


def _confusion(lb: _Lab, model: Path, run: Path, progress: Mode) -> None:
    """The published measurement: its two Japanese prompts and its Korean one, `confusion_n` answers each at
    temperature 1.0; every answer goes to RUN/confusion.jsonl."""
    from ..api.probe import confusion

    confusion(model, n=lb.recipe.confusion_n, temperature=1.0, seed=lb.seed, max_tokens=CONFUSION_TOKENS, out=run,
              progress=progress)


def _prove(lb: _Lab, name: str, progress: Mode) -> None:
    from ..api.probe import cases

    _probe(lb, lb.mpath[name], lb.runs[name], progress)
    cases(lb.mpath[name], out=lb.runs[name], name=name, progress=progress)  # the published cases
    _confusion(lb, lb.mpath[name], lb.runs[name], progress)


@functools.cache
def _heldout_of(data: Path, seed: int) -> list[dict[str, Any]]:
    """The held-out conversations, written with the corpus (for folders from before that: made here)."""
    f = data / "heldout.jsonl"
    return _read_jsonl(f) if f.exists() else _heldout_records(seed)


def _heldout_loss(lb: _Lab, name: str, model: Path, progress: Mode) -> dict[str, Any]:
    from .train import eval_loss

    return {"heldout_loss": {name: round(eval_loss(model, _heldout_of(lb.data, lb.seed)), 6)}}


def _remedy(lb: _Lab, name: str, progress: Mode) -> None:
    from .repair import repair

    r, run = lb.recipe, lb.remedy_runs[name]
    _rm_partial(run)
    cov = name == "coverage5"
    repair(lb.mpath["base"], lb.data / "sft.jsonl", out=run, coverage=lb.data / "coverage.jsonl" if cov else None,
           coverage_share=r.coverage_share if cov else None,
           replay=lb.data / "pretrain.jsonl" if name == "replay" else None,
           replay_ratio=r.replay_ratio if name == "replay" else 0.0, anchor=r.anchor if name == "anchor" else 0.0,
           gate=name == "gate", steps=r.sft_steps, lr=r.sft_lr, batch_size=r.sft_batch, seed=lb.seed,
           betas=(0.9, r.sft_beta2), progress=progress, callbacks=[_steps_to_parent()])
    _probe(lb, run / "model", run, progress)
    _confusion(lb, run / "model", run, progress)


def _write_report(lb: _Lab, progress: Mode) -> None:
    """The comparison page, opening with the lab's verdict (its held-out losses are in lab.json by now)."""
    from ..outputs.report import report

    losses = json.loads((lb.out / R.LAB_STATE).read_text())["heldout_loss"]
    report(lb.runs["baseline"], compare=lb.runs["repaired"], names="baseline,repaired", tokens=[GIVEN_NAME],
           findings=lab_verdict(_results(lb, losses)))


def _stage(name: str, fn: Callable[..., Any], what: str, *args: Any) -> Stage:
    """(name, fn(*args, progress), what): a stage for the runner."""
    return name, functools.partial(fn, *args), what


def _heldout(lb: _Lab, name: str, model: Path) -> Stage:
    return _stage(f"heldout_{name}", _heldout_loss, f"held-out SFT loss: {name}", lb, name, model)


# ---- the recipe, top to bottom ----------------------------------------------------------------------------------

def lab(out: PathLike, *, quick: bool = False, seed: int | None = None, progress: Mode = True,
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
    for m in LAB_PACKAGES:  # up front, not minutes in at the stage that imports it
        need_extra(m, "lab", "`vocabdrift lab`", load=False)
    recipe = recipe or (QUICK if quick else DEFAULT)
    seed = recipe.seed if seed is None else seed
    from ..outputs.location import check_out

    out = check_out(out, lab=True)  # a new or empty folder, or a lab folder; never a model folder, `/` or $HOME
    out.mkdir(parents=True, exist_ok=True)
    st = _Stages(out, recipe, seed, progress)
    if not (out / R.LAB_STATE).exists():
        st.save()  # from its first moment the folder says it is a lab's: a rerun after a kill may resume it
    lb = _Lab(out, recipe, seed)
    mpath = lb.mpath

    st.run_beside([_stage("corpus", _corpus, "corpus: pre-training text and SFT conversations", lb),
                   _stage("tokenizer", _tokenizer, f"tokenizer: byte-level BPE, {recipe.vocab_size:,} tokens", lb)],
                  meanwhile=_import_for_later_stages)
    import torch

    torch.manual_seed(seed)
    # two threads whatever the machine: the recipe's seed was chosen on them, and the thread count changes the
    # floating-point sums, hence the trained model (one CPU gets one thread: two would wait on each other)
    st.run(_stage("base", _base, f"pre-training a tiny Llama ({recipe.pretrain_steps} steps)", lb),
           threads=min(PRETRAIN_THREADS, usable_cpus()))
    # From here on every stage runs on one thread, two independent chains side by side (`run_side_by_side`).
    st.run_side_by_side([
        [_stage("baseline", _train, f"SFT baseline ({recipe.sft_steps} steps)", lb, "baseline", lb.sft_files),
         _stage("analyse_baseline", _analyse, "baseline: diff and coverage", lb, "baseline", lb.sft_files),
         _heldout(lb, "baseline", mpath["baseline"])],
        [_stage("synth", _synth_set, "coverage set (synth)", lb),
         _stage("repaired", _train, f"SFT + coverage set ({recipe.sft_steps} steps)", lb, "repaired",
                lb.repaired_files),
         _stage("analyse_repaired", _analyse, "repaired: diff and coverage", lb, "repaired", lb.repaired_files),
         _heldout(lb, "repaired", mpath["repaired"])]])
    st.run_side_by_side([  # both probe the baseline's most drifted tokens: after both analyses
        [_stage("prove_baseline", _prove, "baseline: probe, cases, confusion (published prompts)", lb, "baseline"),
         _heldout(lb, "base", mpath["base"])],
        [_stage("prove_repaired", _prove, "repaired: probe, cases, confusion (published prompts)", lb, "repaired")]])
    st.run(_stage("report", _write_report, "report: baseline against repaired", lb))
    if remedies if remedies is not None else not quick:
        st.run_side_by_side([[_stage(f"remedy_{k}", _remedy, f"SFT +{k} (repair), diff, probe and confusion", lb, k),
                              _heldout(lb, f"+{k}", p / "model")] for k, p in lb.remedy_runs.items()])
    return _compare(lb, st)


def _reached(lb: _Lab) -> Any:
    """Ids the repaired run's data reach (coverage count > 0): the lab's minimum is over these."""
    cov = R.Run(lb.runs["repaired"]).read_table(R.COVERAGE)
    return cov.filter(cov.column("count").to_numpy() > 0).column("token_id").to_numpy()


def _results(lb: _Lab, losses: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The baseline's and the repaired run's measurements, with their held-out losses: what the verdict reads."""
    planted, reach_ids = _planted_id(lb), _reached(lb)
    results = {k: _measure(p, reach_ids, planted) for k, p in lb.runs.items()}
    for k, v in results.items():
        v.update(heldout_loss=losses[k], heldout_loss_base=losses["base"])
    return results


def _compare(lb: _Lab, st: _Stages) -> LabResult:
    """The measured tables (OUT/lab.md, and OUT/remedies.md when the remedies ran) from the finished run folders."""
    out, runs, remedy_runs = lb.out, lb.runs, lb.remedy_runs
    planted, reach_ids = _planted_id(lb), _reached(lb)
    remedied = all(st.done(f"remedy_{k}") for k in REMEDIES)
    losses = st.state["heldout_loss"]
    results = _results(lb, losses)
    verdict = lab_verdict(results)
    table = comparison_markdown(results)
    if verdict:
        table = "## Verdict\n\n" + "".join(f"- {x}\n" for x in verdict) + "\n## Measured\n\n" + table
    conf = confusion_markdown(results)
    if conf:
        table += "\nLanguage confusion, as published (sampled answers: RUN/confusion.jsonl):\n\n" + conf
    st.state["results"] = results
    st.save()
    _write_text(out / "lab.md", table)
    rem_results, rem_table = None, None
    if remedied:
        rem_results = {"baseline": dict(results["baseline"]), "+coverage": dict(results["repaired"]),
                       **{f"+{k}": _measure(p, reach_ids, planted) for k, p in remedy_runs.items()}}
        for k in REMEDIES:
            rem_results[f"+{k}"].update(heldout_loss=losses[f"+{k}"], heldout_loss_base=losses["base"])
        cost = _costs(lb, remedy_runs)
        for k, v in rem_results.items():
            v["extra_tokens"] = cost[k]
        rem_table = remedies_markdown(rem_results)
        conf = confusion_markdown(rem_results)
        if conf:
            rem_table += "\nLanguage confusion, as published:\n\n" + conf
        st.state["remedies"] = rem_results
        st.save()
        _write_text(out / "remedies.md", rem_table)
    timings = {k: v["seconds"] for k, v in st.state["stages"].items()}
    return LabResult(out=out, runs=runs, models={k: v for k, v in lb.mpath.items() if k != "tokenizer"},
                     results=results, table=table, timings=timings, remedies=rem_results, remedies_table=rem_table,
                     verdict=verdict)


def _import_for_later_stages() -> None:
    """What pre-training and SFT import (torch, transformers' Llama, TRL's trainer, datasets): seconds, spent while
    a worker builds the corpus and the tokenizer; the workers forked later inherit them."""
    import datasets  # noqa: F401
    import torch  # noqa: F401
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401


def _heldout_records(seed: int) -> list[dict[str, Any]]:
    """SFT conversations none of the models trained on (same mix, another seed, no planted name): each model's
    loss on them says what a way of training cost the SFT task itself."""
    from .corpus import sft_records

    return sft_records(HELDOUT, seed=seed + 1_000_003, name=0)


def _write_text(path: Path, text: str) -> None:
    """Through the one atomic writer, so a table is never seen half-written."""
    write_bytes_atomic(path, text.encode("utf-8"))


def _rm_partial(path: Path) -> None:
    """A stage killed after its rename but before lab.json recorded it leaves a finished folder: start it over."""
    import shutil

    if path.exists():
        shutil.rmtree(path)


__all__ = ["DEFAULT", "LARGE", "QUICK", "REMEDIES", "LabResult", "Recipe", "comparison_markdown",
           "confusion_markdown", "lab", "remedies_markdown"]
