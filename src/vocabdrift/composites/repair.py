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

from ..analyses import recommend as A
from ..errors import VocabdriftError
from .train import read_records  # the one reader of training records, shared with evaluate

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


@contextmanager
def _scratch_run() -> Iterator[Any]:
    """A throw-away run folder for the processes other than the main one."""
    from ..outputs.run import Run

    with tempfile.TemporaryDirectory(prefix="vocabdrift-rank-") as tmp:
        yield Run(Path(tmp))


# ---- records --------------------------------------------------------------------------------------------------

def _as_text(r: dict[str, Any]) -> dict[str, Any]:
    """Replay is plain text: a conversation is flattened to its contents."""
    if "text" in r:
        return r
    return {"text": "\n".join(m["content"] for m in r["messages"])}


def count_tokens(records: Sequence[dict[str, Any]], tok: Any) -> int:
    """The records' target tokens: what training learns from and `coverage` counts (the assistant's tokens of a
    chat, every token of plain text), before any truncation. The one size of an SFT set that coverage's table,
    repair's cost line and the plan all give."""
    from ..analyses.coverage import Renderer, target_mask
    from .train import _record_sample

    if not records:
        return 0
    rendered = [r for r in Renderer(tok, targets="assistant").render([_record_sample(r, i) for i, r in
                                                                       enumerate(records)]) if not isinstance(r, str)]
    encs = tok.backend_tokenizer.encode_batch([r.text for r in rendered], add_special_tokens=False)
    return sum(sum(target_mask(len(e.ids), r.spans, e)[1:]) for r, e in zip(rendered, encs, strict=True))


def mix_coverage(records: list[dict[str, Any]], coverage: list[dict[str, Any]], share: float | None, *,
                 seed: int = 0) -> list[dict[str, Any]]:
    """The coverage records to train on beside `records`: all of them, or a seeded draw that makes `share` of the
    training set (cycling through the coverage set in a seeded order when it is smaller than that)."""
    if share is None or not coverage:
        return list(coverage)
    return seeded_draw(coverage, round(share / (1.0 - share) * len(records)), seed=seed)


def seeded_draw(items: Sequence[dict[str, Any]], n: int, *, seed: int) -> list[dict[str, Any]]:
    """`n` of `items` in a seeded order, each once before any twice (cycling when `n` exceeds them)."""
    import random

    if n <= 0 or not items:
        return []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[order[k % len(order)]] for k in range(n)]


def training_plan(*, sft: int, coverage: int, replay: int, steps: int, batch_size: int, processes: int = 1,
                  coverage_set: int | None = None, healing: bool = False) -> dict[str, Any]:
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
            "steps_to_see_all": full, "heal": healing}
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
    sft = "replayed SFT" if plan.get("heal") else "SFT"
    line = (f"repair: {'healing POST on ' if plan.get('heal') else ''}{plan['samples']:,} training samples "
            f"({plan['sft']:,} {sft}, {plan['coverage']:,} coverage, {plan['replay']:,} replay); {plan['steps']:,} "
            f"steps x {plan['batch']:,} = {plan['drawn']:,} drawn, {plan['epochs']:.2f} epochs")
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
           coverage: str | PathLike | None = "auto", min_per_token: int = A.PLACEMENTS, replay: PathLike | None = None,
           replay_ratio: float = 0.05, anchor: float = 0.0, anchor_rarity: bool = False, gate: bool = False,
           freeze: Sequence[str] = (), steps: int | None = None, lr: float | None = None,
           betas: tuple[float, float] = (0.9, 0.999), batch_size: int | None = None, max_length: int = 256,
           seed: int = 0, every: int | None = None, stop_below: float | None = None, threshold: float = 0.95,
           device: str | None = None, callbacks: Sequence[Any] = (), progress: bool = True, untie: bool = False,
           coverage_share: float | None = None, log_every: int | None = None, heal: PathLike | None = None,
           run: PathLike | None = None, max_tokens: int = A.MAX_TOKENS, replay_sft: float = A.REPLAY,
           heldout: PathLike | Sequence[PathLike] | None = None, verify: bool = True,
           tokens_per_sample: int = A.TOKENS_PER_SAMPLE, coverage_weight: float = 1.0) -> Path:
    """Fine-tune BASE (or heal POST) on DATA with remedies, then measure its drift from BASE and, when healing,
    judge it (`evaluate`); writes the run folder `out`.

    Two ways, one recipe (`analyses.recommend`):

    - **Heal** (`heal=POST`, the repair the recommendation names): continue from POST for a short run on
      coverage samples of the tokens at risk in RUN (POST's LOST tokens first, at most `max_tokens`, each
      `min_per_token` times) and `replay_sft` replayed DATA samples per coverage sample, at lr 5e-4, one pass.
      What a user who has POST and cannot afford to retrain needs; measured in the README.
    - **Retrain** from BASE on DATA plus a coverage set: by default the whole vocabulary's at 5% of the samples
      (`coverage_share`; measured: 91% of the LOST tokens back on the quickstart pair); with `run`, RUN's tokens
      at risk, added whole. The other remedies are options.

    Args:
        base: the pre-trained model folder (or hub id): the reference of every drift figure; it is only read.
        data: the SFT data (files or folders: JSONL, JSON, Parquet, saved data sets).
        heal: POST, to heal it instead of retraining from BASE (`--heal POST`). Needs `run`.
        run: the run folder of `diff BASE POST` (with `probe` for the LOST tokens, and `coverage`): which tokens
            are at risk.
        max_tokens: the most tokens at risk covered (LOST first); replay_sft: DATA samples replayed per coverage
            sample when healing.
        heldout: held-out chats for the verdict's task loss (healing judges itself against POST).
        verify: when healing, run `evaluate` on the result and store its verdict (summary["evaluate"]).
        coverage: "auto" (write the coverage set with `synth`: RUN's tokens at risk, or the whole vocabulary
            without `run`), a coverage JSONL to add, or None (no coverage set).
        min_per_token: with coverage="auto", how many times each token is placed as a target.
        tokens_per_sample: with coverage="auto", tokens per coverage sample (several: fewer, longer samples).
        coverage_weight: the loss weight of coverage samples (1.0: as SFT samples; 0.5: each coverage target
            kept with probability 0.5, seeded, so its expected loss is half).
        replay: plain pre-training text to blend in at `replay_ratio` (language-modelling loss).
        anchor: λ of the L2-SP anchor on lm_head (0: off); `anchor_rarity` weights rows by how rarely the run
            has seen each token as a target.
        gate: rare-row gradient gating (rows of tokens absent from a batch's targets get no gradient).
        freeze: "lm_head" and/or "embed".
        steps, lr, betas, batch_size, max_length, seed: the SFT's settings (AdamW). Healing: one pass over the
            heal set at lr 5e-4, batches of 4; retraining: 200 steps at lr 2e-4, batches of 8.
        every: the drift callback's interval (default: steps / 20); `stop_below` stops training when the
            minimum lm_head cosine falls below it.
        callbacks: more `transformers.TrainerCallback`s for the SFT, beside the drift callback.
        untie: give a tied BASE its own lm_head (a copy of the embedding) before training, the published setting;
            a tied model is trained as it is otherwise, with a warning (its lm_head is its input embedding).
        coverage_share: the share of training samples drawn from the coverage set (a seeded subset, or repeats);
            None adds the whole set (retraining with coverage="auto" and no `run`: 0.05). The plan (what share
            of the coverage set the run will see) is logged before training and kept in summary.json's "repair"
            key either way.
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
        from .train import need_training, sft
    except ImportError as e:  # the lab's trainer ships with vocabdrift; its absence is a broken install
        raise VocabdriftError(f"vocabdrift.composites.train is missing ({e}); reinstall vocabdrift") from e

    need_training("`vocabdrift repair`")  # a missing trl/datasets is said now, not after the coverage set is built
    from ..outputs.location import check_out

    datas = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    helds = [] if heldout is None else [heldout] if isinstance(heldout, (str, os.PathLike)) else list(heldout)
    out = check_out(out, models=[base, heal], data=[*datas, *helds, replay])  # never into a model or data folder
    if device is not None:
        from ..device import best_device

        best_device(device)  # `--device cuda` without CUDA: one line now, not a crash in the first step
    if (out / "model").exists():
        raise VocabdriftError(f"{out}/model already exists; pick another -o (repair never overwrites a model)")
    healing = heal is not None
    if healing and run is None:
        raise VocabdriftError("healing POST (--heal POST) needs --run RUN, the run folder of `vocabdrift diff BASE "
                              "POST` (and `probe`): it says which tokens are at risk")
    if run is not None:
        from ..outputs import run as R
        from ..outputs.run import existing_run

        run = existing_run(run)
        if not (Path(run) / R.DRIFT).exists():
            raise VocabdriftError(f"{run}: holds no diff; run `vocabdrift diff BASE POST -o {run}` first")
        if healing:  # said now, not after training, when the verdict would need them
            from .evaluate import check_run_pair

            check_run_pair(run, base, heal)
            if verify and heldout is not None:
                read_records(heldout, what="held-out")
    if not 0.0 < coverage_weight <= 1.0:
        raise VocabdriftError(f"--coverage-weight must be in (0, 1], not {coverage_weight}")
    if max_tokens < 1 or not replay_sft >= 0:
        raise VocabdriftError(f"--max-tokens must be at least 1 and --replay-sft at least 0, not {max_tokens} and "
                              f"{replay_sft}")
    lr = lr if lr is not None else A.HEAL_LR if healing else 2e-4
    batch_size = batch_size if batch_size is not None else 4 if healing else 8
    if steps is not None and steps < 1:
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
    if not healing and str(coverage) == "auto" and run is None and coverage_share is None:
        coverage_share = A.RETRAIN_SHARE  # the whole-vocabulary set, at the measured share (analyses.recommend)

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
    with open_run(out) if main else _scratch_run() as rf:
        cov_records: list[dict[str, Any]] = []
        cov_info: dict[str, Any] | None = None
        cov_set = 0
        if coverage is not None:
            with timer("coverage set"):
                if str(coverage) == "auto":
                    from ..api.coverage import synth

                    res = synth(base, out=rf.path / "coverage.jsonl", min_per_token=min_per_token, seed=seed,
                                progress=progress, run=run, max_tokens=max_tokens,
                                tokens_per_sample=tokens_per_sample)
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
                if not healing:
                    cov_records = mix_coverage(records, cov_records, coverage_share, seed=seed)
                if coverage_share is not None and cov_info is not None:
                    cov_info["share"] = coverage_share

        with timer("train"):
            source = heal if healing else base
            try:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            except (OSError, ValueError) as e:
                raise VocabdriftError(f"{source}: transformers cannot load it as a causal LM ({e}); repair needs a "
                                      "Hugging Face model folder") from e
            if device:
                model = model.to(device)
            terms: list[Any] = []
            if anchor > 0:
                terms.append(remedies.LmHeadAnchor(weight=anchor, rarity="online" if anchor_rarity else None))
            if gate:
                terms.append(remedies.RowGate())
            model_dir = rf.path / "model"
            train_records = records + cov_records
            sft_drawn = records
            if healing:  # the heal set: every coverage sample once, and a seeded draw of DATA replayed beside them
                n_sft = round(len(cov_records) * replay_sft) if cov_records else (steps or 0) * batch_size
                if not cov_records and not steps:
                    raise VocabdriftError("healing without a coverage set (--coverage none) replays DATA alone: say "
                                          "for how long with --steps")
                sft_drawn = seeded_draw(records, n_sft, seed=seed + 1)  # another order than the coverage draw
                train_records = cov_records + sft_drawn
                if not train_records:
                    raise VocabdriftError(f"{run}: no token at risk to heal and nothing to replay; nothing to do")
            if steps is None:
                steps = max(1, math.ceil(len(train_records) / batch_size)) if healing else 200
            cb = VocabDriftCallback(base_ck, every=every or max(1, steps // 20), tokenizer=tok,
                                    stop_below=stop_below, threshold=threshold)
            replay_added: list[dict[str, Any]] = []
            if replay_records and replay_ratio > 0:  # mixed here, not in sft, to count what replay adds
                train_records = remedies.replay_mix(train_records, replay_records, replay_ratio, seed=seed)
                ids = {id(r) for r in replay_records}
                replay_added = [r for r in train_records if id(r) in ids]
            world = int(os.environ.get("WORLD_SIZE", "1"))
            plan = training_plan(sft=len(sft_drawn), coverage=len(cov_records), replay=len(replay_added),
                                 steps=steps, batch_size=batch_size, processes=world,
                                 coverage_set=cov_set if cov_records else None, healing=healing)
            if main:
                log.info("%s", describe_plan(plan))
                if not healing and (warning := plan_warning(plan)) is not None:
                    log.warning("%s", warning)
            encoded: dict[str, Any] = {}
            cov_ids = {id(r) for r in cov_records}
            weights = [coverage_weight if id(r) in cov_ids else 1.0 for r in train_records] \
                if coverage_weight < 1.0 else None
            sft(model, train_records, weights=weights, out=model_dir, steps=steps, lr=lr, betas=betas,
                batch_size=batch_size, max_length=max_length, seed=seed, callbacks=[cb, *callbacks],
                loss_terms=terms, freeze=tuple(freeze), progress=progress, untie=untie, stats=encoded,
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
        heal_sft_tokens = count_tokens(sft_drawn, tok) if healing and sft_drawn else 0
        seen = plan["epochs"]  # how many times each sample is drawn, on average
        drawn = {"coverage": round(cov_tokens * seen), "replay": round(replay_tokens * seen),
                 "sft": round((heal_sft_tokens if healing else sft_tokens) * seen)}
        extra_drawn = drawn["coverage"] + drawn["replay"] + (drawn["sft"] if healing else 0)
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
            "mode": "heal" if healing else "retrain", "start": str(heal) if healing else str(base),
            "run": str(run) if run is not None else None,
            # what training drew (each part's tokens times the passes over it), beside one pass over DATA: a
            # healing run's replayed SFT samples are extra too; a retrain's SFT samples are the SFT itself
            "cost": {"sft_records": len(records), "coverage_records": len(cov_records),
                     "replay_records": len(replay_added), "heal_sft_records": len(sft_drawn) if healing else 0,
                     "sft_tokens": sft_tokens, "coverage_tokens": cov_tokens, "replay_tokens": replay_tokens,
                     "drawn_tokens": drawn, "extra_tokens": extra_drawn,
                     "extra_token_share": round(extra_drawn / max(sft_tokens, 1), 6),
                     "replay_share_of_samples": replay_ratio},
            "callback": {"every": cb.every, "seconds": round(cb.seconds, 3),
                         "history": [{k: v for k, v in h.items() if k == "step" or k.count("/") == 2}
                                     for h in cb.history]},
            "model": "model",
        }
        rf.write_table("vocab.parquet", m.vocab)
        rf.write_table("drift.parquet", m.drift)
        if nt is not None:
            rf.write_table("neighbors.parquet", nt)
        rf.update_summary(**summary)
        rf.record("repair", arguments={"coverage": str(coverage), "min_per_token": min_per_token,
                                        "replay": str(replay or ""), "replay_ratio": replay_ratio, "anchor": anchor,
                                        "anchor_rarity": anchor_rarity, "gate": gate, "freeze": list(freeze),
                                        "steps": steps, "lr": lr, "batch_size": batch_size,
                                        "max_length": max_length, "every": cb.every, "stop_below": stop_below,
                                        "untie": untie, "coverage_share": coverage_share,
                                        "heal": str(heal) if healing else None, "run": str(run) if run else None,
                                        "max_tokens": max_tokens, "replay_sft": replay_sft,
                                        "tokens_per_sample": tokens_per_sample, "coverage_weight": coverage_weight},
                  inputs={"base": str(base), "data": summary["repair"]["data"][0],
                          "checkpoints": {"base": m.info["base"]}},
                  seed=seed, timings={**timer.timings, **m.timings})
    if healing and verify:  # repair proves itself: the verdict of `evaluate` on its own output, against BASE and POST
        from .evaluate import evaluate

        evaluate([out / "model"], base=base, post=heal, run=run, out=out, heldout=heldout, names=[out.name],
                 device=device, max_length=max_length)
    return out


