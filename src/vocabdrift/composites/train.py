"""Training for the lab and for `repair`: a byte-level BPE tokenizer, a tiny Llama pre-trained from scratch, and SFT.

`sft` is the one fine-tuning loop vocabdrift uses (the lab's baseline and repaired models, `repair`): TRL's
`SFTTrainer` on pre-tokenized records with TRL's assistant mask, so the loss falls on assistant tokens only for
chats and on every token for plain text (replay), with drift callbacks, extra loss terms, freezing and replay
plugged in. Everything is deterministic for a seed on CPU, and every model is written to a temporary folder and
renamed into place.
"""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import new_folder
from ..errors import VocabdriftError, need_extra
from ..progress import Mode
from ..progress import bar as progress_lines

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
TRAINING = ("trl", "datasets", "accelerate")  # what `sft` imports beyond the core: pip install 'vocabdrift[train]'

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
# ChatML; {% generation %} marks the assistant's tokens so apply_chat_template can return the loss mask
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}"
    "{{- '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


@contextmanager
def _atomic_dir(out: Path):
    """Yield a temporary folder beside `out`; rename it to `out` on success, remove it on failure."""
    out = Path(out)
    if out.exists():
        raise VocabdriftError(f"{out} already exists; models are never overwritten, pick another path")
    with new_folder(out) as tmp:
        yield tmp


# ---- tokenizer --------------------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 4096, out: PathLike | None = None,
                    must_have: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, with ChatML special tokens and a chat template.

    Args:
        texts: the training text.
        vocab_size: total size including the 256 byte tokens and the special tokens.
        out: if given, a folder to save the tokenizer to (atomically).
        must_have: strings that must come out as one token each (the lab's planted name); a clear error
            otherwise, since the lab's claims are about that one row.

    Returns:
        a transformers fast tokenizer (eos = pad-free `<|endoftext|>`, pad = `<|pad|>`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   chat_template=CHAT_TEMPLATE)
    for s in must_have:
        ids = tok.encode(s).ids
        if len(ids) != 1:
            raise VocabdriftError(f"the tokenizer splits {s!r} into {[tok.id_to_token(i) for i in ids]}; raise its "
                                  "frequency in the corpus or the vocabulary size")
    if out is not None:
        with _atomic_dir(Path(out)) as tmp:
            fast.save_pretrained(tmp)
    return fast


# ---- pre-training -----------------------------------------------------------------------------------------------

def tiny_llama(tokenizer: Any, *, hidden: int = 128, layers: int = 4, heads: int = 4, context: int = 256,
               seed: int = 0) -> PreTrainedModel:
    """A freshly initialised `LlamaForCausalLM` with an untied lm_head, sized for a CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=context, tie_word_embeddings=False,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def pretrain(tokenizer: Any, texts: Sequence[str], *, out: PathLike, steps: int, hidden: int = 128, layers: int = 4,
             heads: int = 4, context: int = 128, batch_size: int = 16, lr: float = 3e-3, warmup: int = 50,
             seed: int = 0, progress: Mode = True) -> tuple[Path, float]:
    """Pre-train a tiny Llama from scratch on `texts` (packed, documents joined by eos); save it to `out`.

    A hand-written loop rather than Trainer: one random window of the packed stream per row, AdamW with warmup
    and cosine decay; on CPU it is the fastest thing that is still a normal causal-LM pre-training.

    Returns:
        (out, mean loss over the last 10% of steps).
    """
    import numpy as np
    import torch

    from ..device import keep_freed_memory

    keep_freed_memory()  # a third of a CPU step was page faults (see its docstring)
    tokenizer = _fast(tokenizer)
    eos = tokenizer.eos_token_id
    enc = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    stream = np.fromiter((t for e in enc for t in (*e.ids, eos)), dtype=np.int64)
    if stream.size <= context + 1:
        raise VocabdriftError(f"pre-training text too short: {stream.size} tokens for a context of {context}")
    model = tiny_llama(tokenizer, hidden=hidden, layers=layers, heads=heads, context=max(256, context), seed=seed)
    data = torch.from_numpy(stream)
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=True)  # one kernel, not ~40 small ops per step

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    tail: list[float] = []
    model.train()
    with _bar(progress, "pre-training", steps) as advance:
        for step in range(steps):
            starts = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=gen)
            batch = torch.stack([data[s: s + context + 1] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss  # (B, T+1); the model shifts labels itself
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step >= steps - max(1, steps // 10):
                tail.append(loss.item())
            advance(loss.item())
    model.eval()
    with _atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out), float(np.mean(tail))


@contextmanager
def _bar(enabled: Mode, what: str, total: int):
    """A rich progress bar with the running loss; lines at a steady pace in a log ("lines"); else a no-op."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if enabled == "lines":
        with progress_lines(enabled, total, what) as advance:
            yield lambda loss: advance(1)
        return

    with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeElapsedColumn(), disable=not enabled, transient=True) as bar:
        task = bar.add_task(what, total=total, loss="-")
        yield lambda loss: bar.update(task, advance=1, loss=f"{loss:.3f}")


# ---- SFT --------------------------------------------------------------------------------------------------------

def _fast(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, os.PathLike)):
        from ..sources.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def _record_sample(r: Any, i: int) -> Any:
    """A training record as coverage's `Sample`: {"messages": [...]} or {"text": ...}."""
    from ..sources.data import Sample

    if isinstance(r, dict) and isinstance(r.get("messages"), list):
        return Sample(f"record {i}", messages=r["messages"])
    if isinstance(r, dict) and isinstance(r.get("text"), str):
        return Sample(f"record {i}", text=r["text"])
    raise VocabdriftError(f"record {i} has neither \"messages\" nor \"text\"; sft takes chats or plain text")


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


def encode_records(tokenizer: Any, records: Iterable[dict[str, Any]], *, max_length: int,
                   stats: dict[str, Any] | None = None, weights: Sequence[float] | None = None,
                   seed: int = 0) -> list[dict[str, list]]:
    """Pre-tokenize records: labels are the generation targets that `coverage` counts, token for token.

    Chats go through the tokenizer's chat template; the assistant's spans come from `analyses.coverage.Renderer`
    (the template's `{% generation %}` markers where it has them, else each assistant message found in the
    rendered text, with its end-of-turn token), so real templates without markers (SmolLM2, Qwen2.5, Llama 3,
    Gemma) train on the assistant's tokens too. Plain text gets eos and a loss on every token (replay).

    Returns rows {"input_ids", "labels"} with labels -100 where there is no loss. Records the template cannot
    render, or whose assistant text it does not reproduce, are dropped (logged, as `coverage` skips them), and so
    are records with no trainable token after truncation. `stats`, when given, receives the counts.

    `weights` (one per record, 1.0 by default) lowers a record's loss weight: each of its targets stays a target
    with probability `weight` (seeded), so its expected loss is `weight` times its full loss while every batch keeps
    TRL's own loss (repair's `coverage_weight`).
    """
    from ..analyses.coverage import Renderer, target_mask

    records = list(records)
    samples = [_record_sample(r, i) for i, r in enumerate(records)]
    if any(s.messages is not None for s in samples) and not getattr(tokenizer, "chat_template", None):
        raise VocabdriftError("the model's tokenizer has no chat template; sft needs one to find the assistant "
                              "tokens (save a tokenizer with chat_template beside the model)")
    renderer = Renderer(tokenizer, targets="assistant")
    rendered = renderer.render(samples)
    bad = [(s.source, r) for s, r in zip(samples, rendered, strict=True) if isinstance(r, str)]
    good = [r for r in rendered if not isinstance(r, str)]
    w_all = list(weights) if weights is not None else [1.0] * len(samples)
    if len(w_all) != len(samples):
        raise VocabdriftError(f"sft: {len(w_all)} weights for {len(samples)} records")
    good_w = [w for w, r in zip(w_all, rendered, strict=True) if not isinstance(r, str)]
    if bad and not good:
        raise VocabdriftError(f"sft: the chat template renders no record usably ({bad[0][0]}: {bad[0][1]}); a "
                              "template that hides or rewrites the assistant's text cannot be trained on with "
                              "vocabdrift's loss mask")
    if bad:
        log.warning("sft: skipped %d of %d records the chat template cannot render (first: %s: %s)", len(bad),
                    len(samples), bad[0][0], bad[0][1])
    encs = tokenizer.backend_tokenizer.encode_batch([r.text for r in good], add_special_tokens=False)
    rows, dropped, targets, kept_targets = [], 0, 0, 0
    for k, (r, enc, w) in enumerate(zip(good, encs, good_w, strict=True)):
        mask = target_mask(len(enc.ids), r.spans, enc)
        targets += sum(mask[1:])  # position 0 predicts nothing: not a target training can reach
        if w < 1.0:  # a lower loss weight: each target kept with probability w, seeded per record
            rng = random.Random(seed * 1_000_003 + k)
            mask = [m and rng.random() < w for m in mask]
        ids, mask = list(enc.ids[:max_length]), mask[:max_length]
        labels = [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        if all(x == -100 for x in labels[1:]):
            dropped += 1
            continue
        kept_targets += sum(mask[1:])
        rows.append({"input_ids": ids, "labels": labels})
    if dropped:
        log.warning("sft: dropped %d records with no trainable token within max_length=%d", dropped, max_length)
    if kept_targets < targets:
        log.warning("sft: max_length=%d cuts %d of the data's %d target tokens (%.1f%%); raise it to train on them",
                    max_length, targets - kept_targets, targets, 100 * (targets - kept_targets) / max(targets, 1))
    if stats is not None:
        stats.update(records=len(samples), unrenderable=len(bad), dropped=dropped, rows=len(rows),
                     target_tokens=targets, trained_tokens=kept_targets, render=renderer.mode)
    if not rows:
        raise VocabdriftError(f"sft: no record has a trainable token within max_length={max_length} (empty "
                              "assistant answers, or max_length too short for the prompts)")
    return rows


def need_training(what: str = "training (`vocabdrift repair`)") -> None:
    """Import TRL, datasets and accelerate, or raise the one-line error that names the `train` extra."""
    for m in TRAINING:
        need_extra(m, "train", what)


def _sft_trainer() -> type:
    from trl import SFTTrainer

    from .remedies import LossTermsMixin

    class SFTLoop(LossTermsMixin, SFTTrainer):
        """TRL's SFTTrainer + loss terms (each `(model, inputs) -> Tensor | None`, added to every step's loss)."""

    return SFTLoop


def sft(model: str | Path | PreTrainedModel, records: Iterable[dict], *, out: str | Path, steps: int,
        lr: float = 2e-4, batch_size: int = 8, max_length: int = 256, seed: int = 0, betas=(0.9, 0.999),
        weight_decay: float = 0.1, warmup_steps: int = 0, callbacks: Sequence = (),
        loss_terms: Sequence[Callable] = (), freeze: Sequence[str] = (), replay: Iterable[dict] | None = None,
        replay_ratio: float = 0.0, progress: Mode = True, untie: bool = False, log_every: int = 0,
        stats: dict[str, Any] | None = None, weights: Sequence[float] | None = None) -> Path:
    """Supervised fine-tuning of a causal LM; the model and its tokenizer are saved to `out`.

    Args:
        model: a model folder, or a loaded `PreTrainedModel` (its tokenizer is read from `model.name_or_path`).
        records: `{"messages": [...]}` (loss on assistant tokens only) or `{"text": ...}` (loss on every token).
        out: the folder to write (temporary folder, then renamed); must not exist.
        steps: optimizer steps.
        lr, betas, weight_decay, warmup_steps: AdamW with a constant learning rate after warmup.
        callbacks: `transformers.TrainerCallback`s, passed through (e.g. `VocabDriftCallback`).
        loss_terms: callables `(model, inputs) -> Tensor | None` added to each step's loss (e.g. `LmHeadAnchor`).
        freeze: "lm_head" and/or "embed": those parameters get requires_grad False.
        replay: plain-text records blended in at `replay_ratio` of the data, deterministically.
        untie: give a tied model its own lm_head before training (`untie_lm_head`); a tied model trained as it is
            moves its input embedding with every lm_head row (a warning says so).
        log_every: write a log line every N steps (step, loss, the drift callback's cosines, time left); 0: off.
            For runs whose output goes to a file, where there is no progress bar.
        stats: if given, receives `encode_records`' counts (records, rows, target and trained tokens).
        weights: a loss weight per record (`encode_records`); None: 1.0 each.

    Returns:
        `out`.

    Example:
        >>> sft("runs/lab/models/base", [{"messages": [...]}, ...], out="runs/lab/models/sft", steps=300)
    """
    need_training()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig

    from ..device import keep_freed_memory
    from . import remedies

    if steps < 1:
        raise VocabdriftError(f"sft: steps must be at least 1, not {steps}")
    if not torch.cuda.is_available():
        keep_freed_memory()  # a third of a CPU step was page faults (see its docstring)
    out = Path(out)
    if out.exists():
        raise VocabdriftError(f"{out} already exists; sft never overwrites a model, pick another path")
    set_seed(seed)
    if isinstance(model, (str, os.PathLike)):
        source = Path(model)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise VocabdriftError(f"{source}: transformers cannot load it as a causal LM ({e})") from e
    else:
        source = Path(getattr(model, "name_or_path", "") or "")
    try:
        tokenizer = _fast(source)
    except VocabdriftError as e:
        raise VocabdriftError(f"sft: no tokenizer for the model ({e}); pass a model folder holding its tokenizer")\
            from e
    if tokenizer.pad_token_id is None:
        raise VocabdriftError(f"{source}: its tokenizer has no pad token; set pad_token in tokenizer_config.json "
                              "(e.g. to the eos token) so batches can be padded")
    records = list(records)
    if replay is not None and replay_ratio > 0:
        records = remedies.replay_mix(records, list(replay), replay_ratio, seed=seed)
    if weights is not None and replay is not None and replay_ratio > 0:
        raise VocabdriftError("sft: weights are per record of `records`; mix replay in before weighting")
    rows = encode_records(tokenizer, records, max_length=max_length, stats=stats, weights=weights, seed=seed)
    if untie:
        if untie_lm_head(model):
            log.warning("sft: untied lm_head from the input embedding (a copy of it); the saved model is untied")
    elif getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None \
            and model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        log.warning("sft: the model ties lm_head to the input embedding, so training moves how each token is read "
                    "along with how it is said; pass untie=True (repair --untie) to train a separate lm_head, as "
                    "the published investigation did")
    if freeze:
        remedies.freeze(model, freeze)

    with tempfile.TemporaryDirectory(prefix="vocabdrift-sft-") as scratch:
        # pre-tokenized rows with their labels (-100 outside the assistant's turns, from the chat template's
        # generation mask): TRL keeps a given "labels" column and pads it with its own collator
        gpu = torch.cuda.is_available()
        args = SFTConfig(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            adam_beta1=betas[0], adam_beta2=betas[1], weight_decay=weight_decay, warmup_steps=warmup_steps,
            lr_scheduler_type="constant_with_warmup", logging_steps=max(1, steps // 20), save_strategy="no",
            report_to=[], use_cpu=not gpu, disable_tqdm=progress is not True, seed=seed,
            data_seed=seed, dataloader_num_workers=0, optim="adamw_torch_fused", max_length=max_length,
            # TRL's defaults (bf16 autocast, activation checkpointing) suit big models on GPUs; on a CPU they only
            # slow the step down and change the numbers
            bf16=gpu and torch.cuda.is_bf16_supported(), **_checkpointing(SFTConfig, gpu))
        dataset = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                                     "labels": [r["labels"] for r in rows]})
        with _quiet_datasets():  # TRL's preparation passes (truncate, drop empty rows) are instant here
            trainer = _sft_trainer()(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                     callbacks=list(callbacks), loss_terms=list(loss_terms))
        _check_labels_kept(trainer, rows)
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        # both print a dict per log step; keep the bar, drop the dicts (callbacks still get on_log)
        trainer.remove_callback(PrinterCallback)
        if progress == "lines" and log_every <= 0:  # in a log: a line about every 5% of the steps
            log_every = max(1, steps // 20)
        if log_every > 0:
            trainer.add_callback(_step_lines(steps, log_every))
        if progress is True:
            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(_quiet_progress())
        with score_trained_positions_only():
            trainer.train()
        # Under `accelerate launch` (several GPUs, DDP or DeepSpeed) every process runs this function: the state
        # dict is gathered by all of them (ZeRO-3 shards it), and the main process alone writes the folder.
        acc = trainer.accelerator
        state_dict = acc.get_state_dict(trainer.model_wrapped)
    model.eval()
    for p in model.parameters():  # a frozen parameter is still a normal weight in the saved folder
        p.requires_grad_(True)
    _stop_at_end_of_turn(model, tokenizer)
    if acc.is_main_process:
        with _atomic_dir(out) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
    acc.wait_for_everyone()
    return out


def _stop_at_end_of_turn(model: Any, tokenizer: Any) -> None:
    """A model trained on chats ends its answers with the template's end-of-turn token (`<|im_end|>`): make it a
    stop token of the saved generation config, as released chat models do (Qwen2.5 lists `<|im_end|>` beside
    `<|endoftext|>`). Without it, sampling runs past the answer into text of an imagined next turn."""
    end = "<|im_end|>"
    if end not in (getattr(tokenizer, "chat_template", None) or "") or end not in tokenizer.get_vocab():
        return
    gc = model.generation_config
    eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [] if gc.eos_token_id is None \
        else [gc.eos_token_id]
    gc.eos_token_id = list(dict.fromkeys([*eos, tokenizer.convert_tokens_to_ids(end)]))


def eval_loss(model: str | Path, records: Iterable[dict], *, batch_size: int = 16, max_length: int = 256) -> float:
    """Mean loss per trained token (the assistant's, or every token of plain text) of `model` on `records`.

    Why: a remedy that keeps lm_head still can also keep the SFT from learning; the loss on held-out SFT data
    says what each way of training cost the task itself.
    """
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    return heldout_loss(m, _fast(Path(model)), records, batch_size=batch_size, max_length=max_length)


def heldout_loss(model: Any, tokenizer: Any, records: Iterable[dict], *, batch_size: int = 16,
                 max_length: int = 256) -> float:
    """`eval_loss` of a loaded model: the targets are the ones `coverage` counts and `sft` trains on
    (`encode_records`), so the loss is on exactly the tokens the SFT data asks the model to say."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    rows = encode_records(tokenizer, records, max_length=max_length)
    # pads input_ids (attention mask 0 there) and labels (-100) to the longest row of each batch, on the right
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            batch = collate(rows[s:s + batch_size])
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
            target = batch["labels"][:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                    reduction="sum")
            total += float(nll)
            count += int((target != -100).sum())
    return total / max(count, 1)


@contextmanager
def score_trained_positions_only() -> Iterator[None]:
    """Let TRL's fused LM head score only the positions that have a label on a CPU too.

    Why: TRL projects through lm_head only the positions with a label on CUDA and XPU, and every position elsewhere
    (so that a compiled Neuron graph keeps one shape). On a CPU nothing is compiled, and the prompt and padding
    positions were most of each lab SFT batch: this makes the step 1.44× faster (bench/sft_step.py). Loss and
    gradients are the same sums, the ignored positions' zeros put back by TRL's own `masked_scatter`. The
    decision is TRL's private `_use_triton` name in `trl.trainer.utils`; if a TRL release renames it, this does
    nothing (tests/test_lab.py fails, so the speed is not lost unnoticed).
    """
    try:
        import trl.trainer.utils as tu

        decide = tu._use_triton
    except (ImportError, AttributeError):
        yield
        return
    tu._use_triton = lambda device: decide(device) or device.type == "cpu"
    try:
        yield
    finally:
        tu._use_triton = decide


def _checkpointing(config: type, on: bool) -> dict[str, bool]:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns)."""
    fields = getattr(config, "__dataclass_fields__", {})
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": on}


@contextmanager
def _quiet_datasets():
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _check_labels_kept(trainer: Any, rows: list[dict[str, list]]) -> None:
    """TRL releases before 1.x rebuilt labels from input_ids in their collator; that would train on the prompts."""
    import trl

    batch = trainer.data_collator([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows[:2]])
    for i, r in enumerate(rows[:2]):
        if batch["labels"][i, : len(r["labels"])].tolist() != r["labels"]:
            raise VocabdriftError(f"trl {trl.__version__} does not keep the assistant-only labels; upgrade it "
                                  "(pip install -U 'trl>=1.0')")


def _quiet_progress() -> Any:
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            pass

    return QuietProgress()


def _step_lines(steps: int, every: int) -> Any:
    """A callback that writes a line every `every` steps (step, loss, the drift callback's lm_head cosines, time
    left) to the log: with no terminal there is no bar, and a long run must still say what it is doing."""
    import time

    from transformers.trainer_callback import TrainerCallback

    class StepLines(TrainerCallback):
        def __init__(self) -> None:
            self.start = time.monotonic()
            self.cos: dict[str, float] = {}

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            logs = logs or {}
            for k in ("vocabdrift/lm_head/min_cos", "vocabdrift/lm_head/mean_cos"):
                if k in logs:
                    self.cos[k.rsplit("/", 1)[1]] = float(logs[k])
            step = state.global_step
            if "loss" not in logs or (step % every and step != steps):
                return
            spent = time.monotonic() - self.start
            left = spent / max(step, 1) * (steps - step)
            cos = "".join(f" lm_head {k} {v:.4f}" for k, v in sorted(self.cos.items(), reverse=True))
            log.info("sft: step %d/%d loss %.4f%s, %s left", step, steps, float(logs["loss"]), cos,
                        _clock(left))

    return StepLines()


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def untie_lm_head(model: Any) -> bool:
    """Give a tied model its own lm_head (a copy of the embedding); True if it was tied.

    Why: in a tied model lm_head *is* the input embedding, so every row a fine-tune moves changes how the token
    is read as well as how it is said, and "drift of lm_head" is drift of the embedding. The published
    investigation trained an untied model; untying first reproduces that setting (the saved model is untied).
    """
    import torch

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", lambda: None)()
    if text_config is not None:
        text_config.tie_word_embeddings = False
    head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    if getattr(model, "_tied_weights_keys", None):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
    return True


def to_hf_folder(model: PathLike, out: PathLike, *, untie: bool = False) -> Path:
    """Save a model that transformers can load (a `.gguf` file, a folder, a hub id) as a Hugging Face folder.

    Why: training needs a Hugging Face folder; a GGUF (dequantized to float32 by transformers) becomes one here,
    untied on request. `out` is written atomically and never overwritten.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ..sources.spec import parse_model_spec
    from ..sources.tokenizer import load_tokenizer

    if Path(out).exists():  # before the load: a GGUF takes many seconds to de-quantize
        raise VocabdriftError(f"{out} already exists; models are never overwritten, pick another path")
    spec = parse_model_spec(model)
    where, gguf = spec.pretrained_source()
    tok = load_tokenizer(model)
    try:
        m = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, gguf_file=gguf)
    except (OSError, ValueError) as e:
        raise VocabdriftError(f"{spec}: transformers cannot load it as a causal LM ({e})") from e
    if gguf:  # transformers marks a model read from GGUF as quantized, but its weights are plain float32 by now
        m.hf_quantizer = None
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
    if untie:
        untie_lm_head(m)
    with _atomic_dir(Path(out)) as tmp:
        m.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(out)


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs, plus deterministic torch kernels where they exist."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
