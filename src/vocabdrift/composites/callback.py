"""`VocabDriftCallback`: watch lm_head drift while a model trains, for the Hugging Face `Trainer` and TRL.

Every `every` steps it compares the live lm_head (and embedding) rows with the reference checkpoint's rows, read
once onto the model's device, and logs the minimum and mean cosine and the share below the threshold, overall and
per vocabulary category. Rows drift silently (the loss does not show it), so this is where a run that is losing
its rare tokens shows up while there is still time to stop it.

Usage:
    >>> cb = VocabDriftCallback("Qwen/Qwen2.5-0.5B", every=50, stop_below=0.5)
    >>> trainer = cb.attach(Trainer(model=model, args=args, train_dataset=ds, processing_class=tok))
    >>> trainer.train()

`attach` (or `Trainer(..., callbacks=[cb])` followed by `cb.attach(trainer)`) sends the numbers through
`trainer.log`, so TensorBoard, W&B and every other reporting integration see them. Passed only as
`callbacks=[cb]`, the callback cannot reach the trainer: the numbers then go into `trainer.state.log_history`
and into the console log lines, but integrations that run before it (TensorBoard, W&B) do not see them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from ..errors import VocabdriftError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, Trainer, TrainerControl, TrainerState, TrainingArguments

    from ..sources.checkpoint import Checkpoint

log = logging.getLogger(__name__)

MONITORS = ("min_cos", "mean_cos")


@dataclass(frozen=True)
class _Vocab:
    """What the callback knows of the vocabulary, on the model's device."""

    keep: torch.Tensor  # bool (V,): rows judged (reachable, non-special when a tokenizer is known)
    codes: torch.Tensor  # int64 (V,): category index per row
    names: tuple[str, ...]  # category names, by code
    texts: tuple[str, ...] | None  # token texts for messages


def _live_weights(model: PreTrainedModel) -> dict[str, torch.nn.Parameter]:
    """The live vocabulary matrices; one entry when lm_head and embeddings share a tensor."""
    out: dict[str, Any] = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None:
        out["lm_head"] = head.weight
    if emb is not None and (head is None or emb.weight.data_ptr() != head.weight.data_ptr()):
        out["embed"] = emb.weight
    if not out:
        raise VocabdriftError(f"{type(model).__name__} has neither get_output_embeddings() nor "
                              "get_input_embeddings(); VocabDriftCallback needs a causal language model")
    return out


def _gathered(params: Sequence[torch.Tensor]) -> contextlib.AbstractContextManager[Any]:
    """Under DeepSpeed ZeRO-3 each rank holds a shard; gather the full matrices for the measurement."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
    return contextlib.nullcontext()


class VocabDriftCallback(TrainerCallback):
    """Log lm_head/embedding drift against a reference checkpoint every `every` steps; warn or stop on a floor.

    Args:
        reference: the checkpoint the model started from (anything `open_checkpoint` takes, or a `Checkpoint`).
        every: measure every this many optimizer steps (and at the start and the end of training).
        tokenizer: a tokenizer (object or path) for the per-category numbers and for telling special and
            unreachable tokens apart; default: the trainer's `processing_class`. Without one, every row counts.
        alert_below: log a warning when the monitored lm_head value falls below this.
        stop_below: stop training (with a message) when it falls below this.
        threshold: the cosine below which a row counts as drifted (the `below_*` share).
        monitor: "min_cos" (the worst row; the default) or "mean_cos".
        population: "reachable" (reachable, non-special rows) or "all" (every non-special row).
        categories: also log lm_head's numbers per category (the embedding is logged overall only: it is the
            side that barely moves, and per-category keys for both would double what the console prints).
        block_rows: rows compared at a time (bounds the temporary memory on the device).
        reference_dtype: dtype the reference is kept in on the device (default: the live weight's dtype, so a
            bf16 model holds a bf16 copy).
        prefix: the log keys' prefix.

    After training, `.history` holds every measurement and `.stop_reason` says why it stopped, if it did.
    """

    def __init__(self, reference: str | os.PathLike | Checkpoint, *, every: int = 50, tokenizer: Any = None,
                 alert_below: float | None = None, stop_below: float | None = None, threshold: float = 0.95,
                 monitor: str = "min_cos", population: str = "reachable", categories: bool = True,
                 block_rows: int = 16384, reference_dtype: torch.dtype | None = None,
                 prefix: str = "vocabdrift") -> None:
        if every < 1:
            raise VocabdriftError(f"every must be at least 1 step, not {every}")
        if monitor not in MONITORS:
            raise VocabdriftError(f"monitor must be one of {', '.join(MONITORS)}, not {monitor!r}")
        if population not in ("reachable", "all"):
            raise VocabdriftError(f"population must be 'reachable' or 'all', not {population!r}")
        self.reference = reference
        self.every = every
        self.tokenizer = tokenizer
        self.alert_below = alert_below
        self.stop_below = stop_below
        self.threshold = threshold
        self.monitor = monitor
        self.population = population
        self.categories = categories
        self.block_rows = block_rows
        self.reference_dtype = reference_dtype
        self.prefix = prefix
        self.history: list[dict[str, float]] = []
        self.stop_reason: str | None = None
        self.seconds = 0.0  # time spent measuring, for the overhead check
        self._ref: dict[str, torch.Tensor] = {}
        self._vocab: _Vocab | None = None
        self._scratch: torch.Tensor | None = None
        self._trainer: weakref.ReferenceType[Trainer] | None = None
        self._pending: dict[str, float] | None = None
        self._pending_step = 0
        self._last_step = -1

    # ---- wiring -----------------------------------------------------------------------------------------------
    def attach(self, trainer: Trainer) -> Trainer:
        """Register with `trainer` (if not already) and log through `trainer.log`, so every integration sees
        the numbers. Returns the trainer."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = weakref.ref(trainer)
        return trainer

    def setup(self, model: PreTrainedModel, tokenizer: Any = None) -> None:
        """Read the reference rows onto the model's device and the vocabulary's categories (once)."""
        import torch

        from ..sources.checkpoint import Checkpoint, open_checkpoint

        live = _live_weights(model)
        ck = self.reference if isinstance(self.reference, Checkpoint) else open_checkpoint(self.reference)
        with _gathered(list(live.values())):
            for kind, w in live.items():
                if ck.hidden_size != w.shape[1]:
                    raise VocabdriftError(f"{ck.path}: hidden size {ck.hidden_size} but the model's {kind} has "
                                          f"{w.shape[1]} columns; the reference must be the model's own base")
                n = min(ck.rows_of(kind), w.shape[0])  # added tokens (resized embeddings) have no reference
                ref = torch.empty(n, w.shape[1], dtype=self.reference_dtype or w.dtype, device=w.device)
                for s, block in ck.iter_blocks(kind, block_rows=self.block_rows, stop=n):
                    ref[s:s + len(block)].copy_(block)
                self._ref[kind] = ref
        rows = max(r.shape[0] for r in self._ref.values())
        self._vocab = self._read_vocab(tokenizer if tokenizer is not None else self.tokenizer, rows,
                                       next(iter(live.values())).device)

    def _read_vocab(self, tokenizer: Any, rows: int, device: torch.device) -> _Vocab:
        import numpy as np
        import torch

        if tokenizer is None:
            log.info("VocabDriftCallback: no tokenizer, so every row counts and there are no categories")
            return _Vocab(torch.ones(rows, dtype=torch.bool, device=device),
                          torch.zeros(rows, dtype=torch.long, device=device), ("all",), None)
        from ..sources.vocabulary import table_of_tokenizer, vocab_table

        if isinstance(tokenizer, (str, os.PathLike)):  # a path: the cached table, as `diff` reads it
            table = vocab_table(tokenizer, size=rows).slice(0, rows)
        else:
            tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
            if not hasattr(tok, "backend_tokenizer"):
                log.warning("VocabDriftCallback: %s is not a fast tokenizer; no categories", type(tok).__name__)
                return self._read_vocab(None, rows, device)
            table = table_of_tokenizer(tok, size=rows).slice(0, rows)
        cats = np.asarray(table.column("category").combine_chunks().cast("string").to_pylist(), dtype=object)
        names, codes = np.unique(cats, return_inverse=True)
        keep = ~table.column("is_special").to_numpy(zero_copy_only=False).astype(bool)
        if self.population == "reachable":
            keep &= table.column("reachable").to_numpy(zero_copy_only=False).astype(bool)
        return _Vocab(torch.as_tensor(keep, device=device), torch.as_tensor(codes, dtype=torch.long, device=device),
                      tuple(str(x) for x in names), tuple(table.column("text").to_pylist()))

    # ---- measuring ----------------------------------------------------------------------------------------
    def measure(self, model: PreTrainedModel) -> dict[str, float]:
        """Compare the live matrices with the reference now; returns the log keys and values."""
        import torch

        from ..analyses.drift import row_stats

        if self._vocab is None:
            self.setup(model)
        assert self._vocab is not None
        t0 = time.perf_counter()
        live = _live_weights(model)
        out: dict[str, float] = {}
        with torch.no_grad(), _gathered(list(live.values())):
            for kind, ref in self._ref.items():
                w = live[kind]
                n, h = ref.shape
                if self._scratch is None or self._scratch.shape[1] != h or self._scratch.device != w.device:
                    self._scratch = torch.empty(min(self.block_rows, n), h, dtype=torch.float32, device=w.device)
                cos = torch.empty(n, dtype=torch.float32, device=w.device)
                bad = torch.zeros(n, dtype=torch.bool, device=w.device)
                for s in range(0, n, self.block_rows):
                    e = min(n, s + self.block_rows)
                    st = row_stats(ref[s:e].float(), w[s:e].float(), scratch=self._scratch)
                    cos[s:e] = st["cos"]
                    bad[s:e] = ~torch.isfinite(st["norm_post"])
                out.update(self._stats(kind, cos, bad))
        if w.device.type == "cuda":
            torch.cuda.synchronize(w.device)
        self.seconds += time.perf_counter() - t0
        return out

    def _stats(self, kind: str, cos: torch.Tensor, bad: torch.Tensor) -> dict[str, float]:
        """Overall and per-category min, mean and share below the threshold, with one device sync."""
        import torch

        v = self._vocab
        assert v is not None
        n = cos.shape[0]
        cos = cos.masked_fill(bad, -1.0)  # a NaN/Inf row is the worst row there is
        keep = v.keep[:n] & torch.isfinite(cos)  # a zero row in the reference has no direction: left out
        c = cos[keep]
        codes = v.codes[:n][keep]
        k = len(v.names)
        p = f"{self.prefix}/{kind}"
        thr = f"below_{self.threshold:g}"
        vals = {
            "count": torch.bincount(codes, minlength=k).float(),
            "sum": torch.bincount(codes, weights=c.double(), minlength=k).float(),
            "below": torch.bincount(codes, weights=(c < self.threshold).double(), minlength=k).float(),
            "min": torch.full((k,), 2.0, device=c.device).scatter_reduce(0, codes, c, "amin"),
        }
        overall = torch.stack([c.min() if c.numel() else torch.tensor(2.0, device=c.device),
                               c.argmin().float() if c.numel() else torch.tensor(-1.0, device=c.device),
                               bad.sum().float()])
        arg = torch.nonzero(keep).flatten()
        host = {name: t.tolist() for name, t in vals.items()}
        o_min, o_arg, o_bad = overall.tolist()
        total = sum(host["count"])
        out: dict[str, float] = {}
        if total:
            out[f"{p}/min_cos"] = round(o_min, 6)
            out[f"{p}/mean_cos"] = round(sum(host["sum"]) / total, 6)
            out[f"{p}/{thr}"] = round(sum(host["below"]) / total, 6)
            out[f"{p}/argmin"] = int(arg[int(o_arg)])
        out[f"{p}/nonfinite"] = int(o_bad)
        if self.categories and kind == "lm_head" and len(v.names) > 1:
            for i, name in enumerate(v.names):
                if host["count"][i]:
                    out[f"{p}/{name}/min_cos"] = round(host["min"][i], 6)
                    out[f"{p}/{name}/mean_cos"] = round(host["sum"][i] / host["count"][i], 6)
                    out[f"{p}/{name}/{thr}"] = round(host["below"][i] / host["count"][i], 6)
        return out

    # ---- reacting -----------------------------------------------------------------------------------------
    def _describe_worst(self, metrics: dict[str, float]) -> str:
        tid = metrics.get(f"{self.prefix}/lm_head/argmin")
        if tid is None:
            return ""
        v = self._vocab
        from ..analyses.vocab import token_label

        shown = token_label(v.texts[int(tid)], int(tid)) if v is not None and v.texts is not None else str(int(tid))
        return f" (worst row: token {shown})"

    def _react(self, metrics: dict[str, float], state: TrainerState, control: TrainerControl) -> None:
        key = f"{self.prefix}/lm_head/{self.monitor}"
        if key not in metrics:
            key = f"{self.prefix}/embed/{self.monitor}"
        value = metrics.get(key)
        if value is None:
            return
        what = f"{key.split('/', 1)[1].replace('/', ' ')} = {value:.4f} at step {state.global_step}"
        if self.stop_below is not None and value < self.stop_below:
            self.stop_reason = (f"VocabDriftCallback stopped training: {what} is below stop_below="
                                f"{self.stop_below:g}{self._describe_worst(metrics)}; the run is losing vocabulary "
                                "rows — lower the learning rate, add coverage data (vocabdrift synth), or anchor "
                                "lm_head (vocabdrift.composites.remedies)")
            control.should_training_stop = True
            if state.is_world_process_zero:
                log.warning(self.stop_reason)
        elif self.alert_below is not None and value < self.alert_below and state.is_world_process_zero:
            log.warning("VocabDriftCallback: %s is below alert_below=%g%s", what, self.alert_below,
                        self._describe_worst(metrics))

    def _emit(self, metrics: dict[str, float], state: TrainerState, control: TrainerControl) -> None:
        self.history.append({**metrics, "step": state.global_step})
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:
            trainer.log(dict(metrics))  # through every reporting integration, into log_history
        else:
            self._pending, self._pending_step = metrics, state.global_step  # merged into the next on_log
            control.should_log = True

    def _due(self, state: TrainerState) -> bool:
        return state.global_step != self._last_step and state.global_step % self.every == 0

    def _run(self, model: PreTrainedModel | None, state: TrainerState, control: TrainerControl) -> None:
        if model is None:
            raise VocabdriftError("VocabDriftCallback got no model from the trainer")
        metrics = self.measure(model)
        self._last_step = state.global_step
        self._emit(metrics, state, control)
        self._react(metrics, state, control)

    # ---- TrainerCallback events -----------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: PreTrainedModel | None = None, processing_class: Any = None, **kwargs: Any) -> None:
        if model is not None and not self._ref:
            self.setup(model, processing_class)
        self._run(model, state, control)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: PreTrainedModel | None = None, **kwargs: Any) -> None:
        if self._due(state):
            self._run(model, state, control)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self._pending is None or logs is None:
            return
        logs.update(self._pending)  # later callbacks (the console progress) see them
        last = state.log_history[-1] if state.log_history else {}
        if last.get("step") == self._pending_step:
            last.update(self._pending)
        else:  # measured at the start of training, before the first log: an entry of its own
            state.log_history.insert(len(state.log_history) - 1 if last else 0,
                                     {**self._pending, "step": self._pending_step})
        self._pending = None

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: PreTrainedModel | None = None, **kwargs: Any) -> None:
        if state.global_step != self._last_step:
            self._run(model, state, control)
        if self._pending is not None:  # no log event follows the end of training
            state.log_history.append({**self._pending, "step": self._pending_step})
            self._pending = None
