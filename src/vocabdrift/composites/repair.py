"""`repair`: fine-tune BASE on DATA with drift remedies on and the drift callback watching, then diff the result.

The remedies, alone or together: the full-vocabulary coverage set (`synth`, the published fix), replay of plain
pre-training text, an L2-SP anchor on lm_head, rare-row gradient gating, and freezing. The run folder OUT holds
the trained model (OUT/model), the coverage set it used, and diff's tables against BASE, with a "repair" key in
summary.json saying what was done, what it cost in extra training tokens and what the callback saw.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import VocabdriftError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


@contextmanager
def _scratch_run() -> Iterator[Any]:
    """A throw-away run folder for the processes other than the main one."""
    from ..outputs.run import Run

    with tempfile.TemporaryDirectory(prefix="vocabdrift-rank-") as tmp:
        yield Run(Path(tmp))


# ---- records --------------------------------------------------------------------------------------------------

def _sample_record(s: Any) -> dict[str, Any]:
    """A `sources.data.Sample` as sft's record: {"messages": [...]} or {"text": ...}."""
    if s.messages is not None:
        return {"messages": s.messages}
    if s.text is not None:
        return {"text": s.text}
    return {"messages": [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.completion}]}


def read_records(paths: PathLike | Sequence[PathLike], *, what: str) -> list[dict[str, Any]]:
    """Every usable record of a data set; malformed ones are counted and logged, none at all is an error."""
    from ..sources.data import DataReader

    reader = DataReader([paths] if isinstance(paths, (str, os.PathLike)) else list(paths))
    records = [_sample_record(s) for s in reader]
    if reader.n_malformed:
        first = reader.malformed[0]
        log.warning("%s: skipped %d malformed records (first: %s: %s)", what, reader.n_malformed, first.source,
                    first.reason)
    if not records:
        raise VocabdriftError(f"{paths}: no usable {what} records (messages, conversations, prompt/completion or "
                              "text)")
    return records


def _as_text(r: dict[str, Any]) -> dict[str, Any]:
    """Replay is plain text: a conversation is flattened to its contents."""
    if "text" in r:
        return r
    return {"text": "\n".join(m["content"] for m in r["messages"])}


def count_tokens(records: Sequence[dict[str, Any]], tok: Any) -> int:
    """Tokens of the records' contents (what they add to training, template tokens left out)."""
    texts = [r["text"] if "text" in r else m["content"] for r in records
             for m in ([None] if "text" in r else r["messages"])]
    backend = tok.backend_tokenizer
    return sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))


def mix_coverage(records: list[dict[str, Any]], coverage: list[dict[str, Any]], share: float | None, *,
                 seed: int = 0) -> list[dict[str, Any]]:
    """The coverage records to train on beside `records`: all of them, or a seeded draw that makes `share` of the
    training set (cycling through the coverage set in a seeded order when it is smaller than that)."""
    import random

    if share is None or not coverage:
        return list(coverage)
    want = round(share / (1.0 - share) * len(records))
    order = list(range(len(coverage)))
    random.Random(seed).shuffle(order)
    return [coverage[order[k % len(order)]] for k in range(want)]


def training_plan(*, sft: int, coverage: int, replay: int, steps: int, batch_size: int, processes: int = 1,
                  coverage_set: int | None = None) -> dict[str, Any]:
    """What a run of `steps` will actually see of each part of its data, computed before training.

    Why: on a 49K vocabulary the full coverage set is tens of thousands of samples, and a short run draws a few
    thousand: most coverage samples (and the tokens only they hold) are never trained on. The trainer shuffles
    the whole set once per epoch, so a share `min(1, epochs)` of every part is seen. `coverage_set` is the size
    of the coverage set when only a share of it was mixed in (`mix_coverage`).
    """
    total = sft + coverage + replay
    drawn = steps * batch_size * processes
    epochs = drawn / max(total, 1)
    seen = min(1.0, epochs)
    full = math.ceil(total / max(batch_size * processes, 1))
    plan = {"samples": total, "sft": sft, "coverage": coverage, "replay": replay, "steps": steps,
            "batch": batch_size * processes, "drawn": drawn,
            "epochs": round(epochs, 4), "coverage_share": round(coverage / max(total, 1), 6),
            "coverage_per_batch": round(coverage / max(total, 1) * batch_size, 3),
            "coverage_set": coverage if coverage_set is None else coverage_set,
            "steps_to_see_all": full}
    distinct = min(coverage, plan["coverage_set"])  # a share drawn with repeats holds each sample once or more
    plan["coverage_seen"] = round(seen * distinct)
    plan["coverage_seen_share"] = round(plan["coverage_seen"] / max(plan["coverage_set"], 1), 6)
    per_step = coverage / max(total, 1) * batch_size * processes  # coverage samples drawn per step
    plan["steps_for_whole_set"] = math.ceil(plan["coverage_set"] / per_step) if per_step else None
    return plan


# Above this share of the samples, coverage data raised the lab's language confusion (12% and the whole set did;
# 5% did not): docs/LAB.md, "Why coverage raises confusion here".
LARGE_COVERAGE_SHARE = 0.1


def describe_plan(plan: dict[str, Any]) -> str:
    """The plan as one line for the log."""
    line = (f"repair: {plan['samples']:,} training samples ({plan['sft']:,} SFT, {plan['coverage']:,} coverage, "
            f"{plan['replay']:,} replay); {plan['steps']:,} steps x {plan['batch']:,} = {plan['drawn']:,} drawn, "
            f"{plan['epochs']:.2f} epochs")
    if plan["coverage"]:
        line += (f"; coverage is {100 * plan['coverage_share']:.1f}% of the samples (~{plan['coverage_per_batch']:.2f}"
                 f" per batch); about {plan['coverage_seen']:,} of the coverage set's {plan['coverage_set']:,} "
                 f"samples will be seen ({100 * plan['coverage_seen_share']:.0f}%)")
        if plan["coverage_seen_share"] < 1.0:
            line += (f"; to train on the whole set, take {plan['steps_for_whole_set']:,} steps at this mix, raise "
                     "--coverage-share, or pass a smaller set (synth --run RUN)")
    return line


def plan_warning(plan: dict[str, Any]) -> str | None:
    """A warning when the plan gives coverage a share that raised language confusion in the lab."""
    if plan["coverage_share"] <= LARGE_COVERAGE_SHARE:
        return None
    return (f"repair: coverage is {100 * plan['coverage_share']:.0f}% of the samples; in the lab a share above "
            f"{LARGE_COVERAGE_SHARE:.0%} taught the model to switch scripts (docs/LAB.md, \"Why coverage raises "
            "confusion here\"): run `vocabdrift confusion` on BASE and on the repaired model, or lower "
            "--coverage-share")


# ---- repair ---------------------------------------------------------------------------------------------------

def repair(base: PathLike, data: PathLike | Sequence[PathLike], *, out: PathLike,
           coverage: str | PathLike | None = "auto", min_per_token: int = 2, replay: PathLike | None = None,
           replay_ratio: float = 0.05, anchor: float = 0.0, anchor_rarity: bool = False, gate: bool = False,
           freeze: Sequence[str] = (), steps: int = 200, lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.999),
           batch_size: int = 8, max_length: int = 256, seed: int = 0, every: int | None = None,
           stop_below: float | None = None, threshold: float = 0.95, device: str | None = None,
           callbacks: Sequence[Any] = (), progress: bool = True, untie: bool = False,
           coverage_share: float | None = None, log_every: int | None = None) -> Path:
    """Fine-tune BASE on DATA with remedies, then measure its drift from BASE; writes the run folder `out`.

    Args:
        base: a Hugging Face model folder (or hub id) to start from; it is only read.
        data: the SFT data (files or folders: JSONL, JSON, Parquet, saved data sets).
        coverage: "auto" (write the full-vocabulary coverage set with `synth` and add it), a coverage JSONL
            to add, or None (no coverage set).
        min_per_token: with coverage="auto", how many times each token is placed as a target.
        replay: plain pre-training text to blend in at `replay_ratio` (language-modelling loss).
        anchor: λ of the L2-SP anchor on lm_head (0: off); `anchor_rarity` weights rows by how rarely the run
            has seen each token as a target.
        gate: rare-row gradient gating (rows of tokens absent from a batch's targets get no gradient).
        freeze: "lm_head" and/or "embed".
        steps, lr, betas, batch_size, max_length, seed: the SFT's settings (AdamW).
        every: the drift callback's interval (default: steps / 20); `stop_below` stops training when the
            minimum lm_head cosine falls below it.
        callbacks: more `transformers.TrainerCallback`s for the SFT, beside the drift callback.
        untie: give a tied BASE its own lm_head (a copy of the embedding) before training, the published setting;
            a tied model is trained as it is otherwise, with a warning (its lm_head is its input embedding).
        coverage_share: the share of training samples drawn from the coverage set (a seeded subset, or repeats);
            None adds the whole set. The plan (what share of the coverage set the run will see) is logged before
            training and kept in summary.json's "repair" key either way.
        log_every: a log line every N steps (step, loss, min/mean lm_head cosine, time left); default: every
            steps/20 when there is no progress bar, off with one.

    Returns:
        `out`: OUT/model is the trained checkpoint; vocab.parquet, drift.parquet, neighbors.parquet,
        summary.json (with "repair") and manifest.json sit beside it.

    Example:
        >>> repair("base/", "sft.jsonl", out="runs/fixed", coverage="auto", anchor=1e-2)
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ..analyses import drift as D
    from ..api.diff import measure, neighbor_table
    from ..device import process_rank
    from ..outputs.run import Timer, open_run
    from ..sources.checkpoint import open_checkpoint
    from ..sources.tokenizer import load_tokenizer
    from . import remedies
    from .callback import VocabDriftCallback

    try:
        from .train import sft
    except ImportError as e:  # the lab's trainer ships with vocabdrift; its absence is a broken install
        raise VocabdriftError(f"vocabdrift.composites.train is missing ({e}); reinstall vocabdrift") from e

    out = Path(out)
    if (out / "model").exists():
        raise VocabdriftError(f"{out}/model already exists; pick another -o (repair never overwrites a model)")
    if steps < 1:
        raise VocabdriftError(f"--steps must be at least 1, not {steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise VocabdriftError(f"--lr must be a positive number, not {lr}")
    if batch_size < 1 or max_length < 2:
        raise VocabdriftError(f"--batch-size must be at least 1 and --max-length at least 2, not {batch_size} and "
                              f"{max_length}")
    if not 0.0 <= replay_ratio < 1.0:  # NaN fails these comparisons too
        raise VocabdriftError(f"--replay-ratio must be in [0, 1), not {replay_ratio}")
    if not anchor >= 0 or not math.isfinite(anchor):
        raise VocabdriftError(f"--anchor must be a number >= 0, not {anchor}")
    if stop_below is not None and not -1.0 <= stop_below <= 1.0:
        raise VocabdriftError(f"--stop-below is a cosine in [-1, 1], not {stop_below}")
    bad = [f for f in freeze if f not in remedies.FREEZABLE]
    if bad:
        raise VocabdriftError(f"--freeze {bad[0]!r}: choose from {', '.join(remedies.FREEZABLE)}")
    if coverage_share is not None and not 0.0 < coverage_share < 1.0:
        raise VocabdriftError(f"--coverage-share must be in (0, 1), not {coverage_share}")
    if coverage is not None and str(coverage) != "auto" and not Path(coverage).exists():
        raise VocabdriftError(f"--coverage {coverage}: no such file; pass a coverage JSONL, 'auto' or nothing")

    timer = Timer()
    base_ck = open_checkpoint(base)  # fails early, with a clear message, on a bad BASE
    tok = load_tokenizer(base)
    with timer("read data"):
        records = read_records(data, what="SFT")
        replay_records = [_as_text(r) for r in read_records(replay, what="replay")] if replay else None
    if replay_records is None:
        replay_ratio = 0.0
    if not getattr(tok, "chat_template", None) and any("messages" in r for r in records):
        raise VocabdriftError(f"{base}: its tokenizer has no chat template, so the assistant tokens of the chats "
                              "cannot be found; save a tokenizer_config.json with a chat_template beside the model")
    if tok.pad_token_id is None:
        raise VocabdriftError(f"{base}: its tokenizer has no pad token; set pad_token in tokenizer_config.json "
                              "(e.g. to the eos token) so batches can be padded")

    # Under `accelerate launch` / torchrun (several GPUs) every process runs this function. Each builds the same
    # data (synth is deterministic) and trains its share; only the main process writes OUT and measures.
    main = process_rank() == 0
    progress = progress and main
    with open_run(out) if main else _scratch_run() as run:
        cov_records: list[dict[str, Any]] = []
        cov_info: dict[str, Any] | None = None
        cov_set = 0
        if coverage is not None:
            with timer("coverage set"):
                if str(coverage) == "auto":
                    from ..api.coverage import synth

                    res = synth(base, out=run.path / "coverage.jsonl", min_per_token=min_per_token, seed=seed,
                                progress=progress)
                    st = res.stats  # the full stats (with id lists) stay in coverage.stats.json
                    cov_path, cov_info = res.path, {
                        "source": "auto", "file": "coverage.jsonl", "targets": st.get("targets"),
                        "covered": st.get("covered"), "samples": st.get("samples"),
                        "skipped": len(st.get("skipped", [])),
                        "unreachable": (st.get("unreachable") or {}).get("count")}
                else:
                    cov_path = Path(coverage)
                    cov_info = {"source": str(coverage)}
                cov_records = read_records(cov_path, what="coverage")
                cov_set = len(cov_records)
                if cov_info is not None:
                    cov_info["records"] = cov_set
                cov_records = mix_coverage(records, cov_records, coverage_share, seed=seed)
                if coverage_share is not None and cov_info is not None:
                    cov_info["share"] = coverage_share

        with timer("train"):
            try:
                model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            except (OSError, ValueError) as e:
                raise VocabdriftError(f"{base}: transformers cannot load it as a causal LM ({e}); repair needs a "
                                      "Hugging Face model folder") from e
            if device:
                model = model.to(device)
            cb = VocabDriftCallback(base_ck, every=every or max(1, steps // 20), tokenizer=tok,
                                    stop_below=stop_below, threshold=threshold)
            terms: list[Any] = []
            if anchor > 0:
                terms.append(remedies.LmHeadAnchor(weight=anchor, rarity="online" if anchor_rarity else None))
            if gate:
                terms.append(remedies.RowGate())
            model_dir = run.path / "model"
            train_records = records + cov_records
            replay_added: list[dict[str, Any]] = []
            if replay_records and replay_ratio > 0:  # mixed here, not in sft, to count what replay adds
                train_records = remedies.replay_mix(train_records, replay_records, replay_ratio, seed=seed)
                ids = {id(r) for r in replay_records}
                replay_added = [r for r in train_records if id(r) in ids]
            world = int(os.environ.get("WORLD_SIZE", "1"))
            plan = training_plan(sft=len(records), coverage=len(cov_records), replay=len(replay_added),
                                 steps=steps, batch_size=batch_size, processes=world,
                                 coverage_set=cov_set if cov_records else None)
            if main:
                log.info("%s", describe_plan(plan))
                if (warning := plan_warning(plan)) is not None:
                    log.warning("%s", warning)
            encoded: dict[str, Any] = {}
            sft(model, train_records, out=model_dir, steps=steps, lr=lr, betas=betas, batch_size=batch_size,
                max_length=max_length, seed=seed, callbacks=[cb, *callbacks], loss_terms=terms, freeze=tuple(freeze),
                progress=progress, untie=untie, stats=encoded,
                log_every=(max(1, steps // 20) if not progress else 0) if log_every is None else log_every)
            del model
            if not main:
                return out
            if not (model_dir / "tokenizer.json").exists():
                tok.save_pretrained(model_dir)

        with timer("diff"):
            m = measure(base_ck, model_dir, device=device, progress=progress)
            summary = m.summary(threshold=threshold)
            top = D.most_drifted(m.drift, m.vocab, 20).column("token_id").to_pylist()
            nt = neighbor_table({"base": base_ck, "post": open_checkpoint(model_dir)}, top, device=device,
                                stop=m.info["common_rows"]) if top else None

        sft_tokens = count_tokens(records, tok)
        cov_tokens = count_tokens(cov_records, tok) if cov_records else 0
        replay_tokens = count_tokens(replay_added, tok) if replay_added else 0
        summary["repair"] = {
            "base": str(base), "data": [str(d) for d in ([data] if isinstance(data, (str, os.PathLike)) else data)],
            "remedies": {"coverage": cov_info, "replay": {"source": str(replay), "ratio": replay_ratio}
                         if replay_records else None, "anchor": anchor, "anchor_rarity": anchor_rarity,
                         "gate": gate, "freeze": list(freeze)},
            "training": {"steps": steps, "lr": lr, "betas": list(betas), "batch_size": batch_size,
                         "max_length": max_length, "seed": seed, "stopped": cb.stop_reason,
                         "processes": world, "untied": bool(untie and base_ck.tied),
                         "targets": encoded},
            "plan": plan,
            "cost": {"sft_records": len(records), "coverage_records": len(cov_records),
                     "replay_records": len(replay_added), "sft_tokens": sft_tokens, "coverage_tokens": cov_tokens,
                     "replay_tokens": replay_tokens, "extra_tokens": cov_tokens + replay_tokens,
                     "extra_token_share": round((cov_tokens + replay_tokens) / max(sft_tokens, 1), 6),
                     "replay_share_of_samples": replay_ratio},
            "callback": {"every": cb.every, "seconds": round(cb.seconds, 3),
                         "history": [{k: v for k, v in h.items() if k == "step" or k.count("/") == 2}
                                     for h in cb.history]},
            "model": "model",
        }
        run.write_table("vocab.parquet", m.vocab)
        run.write_table("drift.parquet", m.drift)
        if nt is not None:
            run.write_table("neighbors.parquet", nt)
        run.update_summary(**summary)
        run.record("repair", arguments={"coverage": str(coverage), "min_per_token": min_per_token,
                                        "replay": str(replay or ""), "replay_ratio": replay_ratio, "anchor": anchor,
                                        "anchor_rarity": anchor_rarity, "gate": gate, "freeze": list(freeze),
                                        "steps": steps, "lr": lr, "batch_size": batch_size,
                                        "max_length": max_length, "every": cb.every, "stop_below": stop_below,
                                        "untie": untie, "coverage_share": coverage_share},
                   inputs={"base": str(base), "data": summary["repair"]["data"][0],
                           "checkpoints": {"base": m.info["base"]}},
                   seed=seed, timings={**timer.timings, **m.timings})
    return out

