"""Training-side remedies for lm_head drift that need no extra data, as drop-in pieces for a normal Trainer.

- `LmHeadAnchor`: L2-SP, λ·Σ_t w_t‖W_t − W_base,t‖² on lm_head rows, optionally weighted toward tokens that are
  rare in the SFT data (those are the rows with nothing but push-down gradient to move them).
- `RowGate`: rare-row gradient gating in the manner of AGG: a gradient hook zeroes the lm_head rows of tokens
  that are not among the batch's targets, so they get no push-down gradient from the softmax.
- `freeze`: freeze lm_head and/or the input embeddings.
- `replay_mix`: blend a share of plain pre-training text into the SFT records (language-modelling loss).

Each loss-term object is a callable `(model, inputs) -> Tensor | None`, the shape `composites.train.sft` takes in
`loss_terms`. With a plain `transformers.Trainer` (or TRL's `SFTTrainer`), add them with `AnchoredTrainer` or the
`LossTermsMixin`:

    >>> anchor = LmHeadAnchor(weight=1e-2)            # snapshot of lm_head at the first step
    >>> gate = RowGate()
    >>> trainer = AnchoredTrainer(model=model, args=args, train_dataset=ds, loss_terms=[anchor, gate])
    >>> class MySFT(LossTermsMixin, SFTTrainer): ...  # the same for TRL

Note on optimizers: gating zeroes a row's gradient, so AdamW's update for a row that was never a target is
zero, but decoupled weight decay still shrinks it (its direction, and so its cosine, is unchanged). Exclude the
vocabulary matrices from weight decay if their norms matter too.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import VocabdriftError
from ..outputs import run as R

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedModel

    from ..sources.checkpoint import Checkpoint

log = logging.getLogger(__name__)

FREEZABLE = ("lm_head", "embed")


def _head_weight(model: Any) -> torch.nn.Parameter:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise VocabdriftError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None); "
                              "these remedies need a causal language model with an lm_head")
    return head.weight


def _is_tied(model: Any) -> bool:
    emb = model.get_input_embeddings()
    return emb is not None and emb.weight.data_ptr() == _head_weight(model).data_ptr()


def target_ids(inputs: dict[str, Any]) -> torch.Tensor:
    """The token ids the batch trains the model to say: labels shifted by one (causal LM), -100 dropped.

    Without `labels`, the next-token targets of `input_ids` under the attention mask.
    """
    labels = inputs.get("labels")
    if labels is None:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        t = ids[..., 1:]
        return t[mask[..., 1:].bool()] if mask is not None else t.reshape(-1)
    t = labels[..., 1:]  # the model shifts: position i predicts labels[i + 1]
    return t[t >= 0]


# ---- rarity ---------------------------------------------------------------------------------------------------

def rarity_weights(counts: np.ndarray | torch.Tensor, *, floor: float = 5.0) -> torch.Tensor:
    """Per-row weights from how often each token is a target in the SFT data: floor / (floor + count).

    A token never seen as a target gets 1, one seen `floor` times 1/2, a frequent one nearly 0. The weights are
    scaled to mean 1, so the anchor's λ means the same with and without them. float32 (V,).
    """
    import torch

    c = torch.as_tensor(counts, dtype=torch.float32).clamp_min(0)
    w = floor / (floor + c)
    return w / w.mean().clamp_min(1e-12)


def counts_from_coverage(run_or_file: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Target counts per token id from a coverage.parquet (a file, or a run folder holding one)."""
    from pathlib import Path

    import numpy as np
    import pyarrow.parquet as pq

    p = Path(run_or_file)
    if p.is_dir():
        p = p / R.COVERAGE
    if not p.exists():
        raise VocabdriftError(f"{p}: not found; write it with `vocabdrift coverage DATA --tokenizer MODEL -o RUN`")
    t = pq.read_table(p, columns=["token_id", "count"])
    ids = t.column("token_id").to_numpy()
    n = max(vocab_size or 0, int(ids.max()) + 1 if len(ids) else 0)
    out = np.zeros(n, dtype=np.int64)
    out[ids] = t.column("count").to_numpy()
    return out


# ---- the anchor -----------------------------------------------------------------------------------------------

class LmHeadAnchor:
    """L2-SP on lm_head: λ·Σ_t w_t‖W_t − W_base,t‖², a loss term that pulls every row back toward its base.

    Args:
        reference: where W_base comes from: a checkpoint (anything `open_checkpoint` takes, or a `Checkpoint`),
            or None to snapshot the model's lm_head at the first call (the usual case: training starts from base).
        weight: λ. The penalty is a sum over rows (not a mean), so the pull on one row does not shrink as the
            vocabulary grows; 1e-3 to 1e-1 suits a model trained at lr 1e-5..2e-4.
        rarity: per-row weighting: None (all rows alike), "online" (floor/(floor + times the token was a target
            so far in this run)), a path to coverage.parquet or its run folder, or an array of counts (V,).
        floor: the count at which a token's weight halves.
        embed: also anchor the input embedding (separately stored models only).

    Called as `anchor(model, inputs)`, it returns the penalty (a scalar tensor on the model's device).
    """

    def __init__(self, reference: str | os.PathLike | Checkpoint | None = None, *, weight: float = 1e-2,
                 rarity: str | os.PathLike | np.ndarray | torch.Tensor | None = None, floor: float = 5.0,
                 embed: bool = False) -> None:
        if weight < 0:
            raise VocabdriftError(f"the anchor weight must be >= 0, not {weight}")
        self.reference = reference
        self.weight = weight
        self.rarity = rarity
        self.floor = floor
        self.embed = embed
        self._base: dict[str, torch.Tensor] = {}
        self._w: torch.Tensor | None = None  # (V,) row weights, or None for uniform
        self._online: torch.Tensor | None = None  # (V,) running target counts

    def _setup(self, model: PreTrainedModel) -> None:
        import torch

        mats = {"lm_head": _head_weight(model)}
        if self.embed and not _is_tied(model):
            mats["embed"] = model.get_input_embeddings().weight
        ck = None
        if self.reference is not None:
            from ..sources.checkpoint import Checkpoint, open_checkpoint

            ck = self.reference if isinstance(self.reference, Checkpoint) else open_checkpoint(self.reference)
        for kind, w in mats.items():
            if ck is None:
                self._base[kind] = w.detach().clone()
                continue
            if ck.hidden_size != w.shape[1] or ck.rows_of(kind) < w.shape[0]:
                raise VocabdriftError(f"{ck.path}: its {kind} is {ck.rows_of(kind)}x{ck.hidden_size} but the "
                                      f"model's is {tuple(w.shape)}; anchor to the model's own base checkpoint")
            self._base[kind] = ck.rows(kind, 0, w.shape[0], device=w.device).to(w.dtype)
        v, dev = mats["lm_head"].shape[0], mats["lm_head"].device
        if isinstance(self.rarity, str) and self.rarity == "online":
            self._online = torch.zeros(v, dtype=torch.float32, device=dev)
        elif self.rarity is not None:
            counts = self.rarity
            if isinstance(counts, (str, os.PathLike)):
                counts = counts_from_coverage(counts, v)
            counts = torch.as_tensor(counts, dtype=torch.float32)
            if counts.shape[0] < v:  # ids beyond the coverage table were never seen
                counts = torch.cat([counts, torch.zeros(v - counts.shape[0])])
            self._w = rarity_weights(counts[:v], floor=self.floor).to(dev)

    def __call__(self, model: PreTrainedModel, inputs: dict[str, Any]) -> torch.Tensor | None:
        import torch

        if self.weight == 0:
            return None
        if not self._base:
            self._setup(model)
        w_rows = self._w
        if self._online is not None:
            t = target_ids(inputs)
            self._online += torch.bincount(t.to(self._online.device), minlength=self._online.shape[0]
                                           )[: self._online.shape[0]].float()
            w_rows = rarity_weights(self._online, floor=self.floor)
        total = None
        for kind, base in self._base.items():
            w = _head_weight(model) if kind == "lm_head" else model.get_input_embeddings().weight
            d = (w.float() - base.float()).pow(2).sum(dim=1)  # (V,) squared distance per row
            term = (d * w_rows).sum() if (w_rows is not None and kind == "lm_head") else d.sum()
            total = term if total is None else total + term
        return self.weight * total


# ---- gradient gating ------------------------------------------------------------------------------------------

class RowGate:
    """Rare-row gradient gating (after AGG): lm_head rows of tokens absent from the batch's targets get no gradient.

    A softmax gives every non-target token a small push-down gradient; summed over a long SFT on narrow data,
    it turns the rows of tokens the data never asks for. The gate registers a hook on the lm_head weight's
    gradient that zeroes those rows, batch by batch. Called as `gate(model, inputs)` before the backward pass
    (as a loss term: it returns None), it records which rows the batch targets.

    Args:
        min_count: gate only tokens seen as a target fewer than this many times so far in the run (running
            count); None gates every token absent from the batch, frequent ones included.
    With tied embeddings the tokens of the batch's inputs keep their rows too (they carry the input gradient).
    """

    def __init__(self, *, min_count: int | None = None) -> None:
        self.min_count = min_count
        self.gated_rows = 0  # rows zeroed in the last backward, for logging and tests
        self._mask: torch.Tensor | None = None  # (V,) 1.0 = keep the row's gradient
        self._counts: torch.Tensor | None = None
        self._handle: Any = None
        self._param: Any = None

    def attach(self, model: PreTrainedModel) -> RowGate:
        """Register the gradient hook on the model's lm_head weight (done by the first call otherwise)."""
        w = _head_weight(model)
        if self._param is w:
            return self
        self.detach()
        self._param = w
        self._tied = _is_tied(model)
        self._handle = w.register_hook(self._hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = self._param = None

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        if self._mask is None:
            return grad
        mask = self._mask.to(grad.dtype)
        self.gated_rows = int((mask == 0).sum())
        return grad * mask[:, None]

    def __call__(self, model: PreTrainedModel, inputs: dict[str, Any]) -> None:
        import torch

        self.attach(model)
        v = self._param.shape[0]
        dev = self._param.device
        keep = torch.zeros(v, dtype=torch.bool, device=dev)
        t = target_ids(inputs).to(dev)
        keep[t[t < v]] = True
        if self._tied:
            ids = inputs["input_ids"].to(dev)
            keep[ids[(ids >= 0) & (ids < v)]] = True
        if self.min_count is not None:
            if self._counts is None:
                self._counts = torch.zeros(v, dtype=torch.long, device=dev)
            self._counts += torch.bincount(t[t < v], minlength=v)
            keep |= self._counts >= self.min_count  # frequent tokens keep their push-down
        self._mask = keep
        return None


# ---- freezing and replay --------------------------------------------------------------------------------------

def freeze(model: PreTrainedModel, parts: Iterable[str]) -> list[str]:
    """Stop training lm_head and/or the input embeddings ("lm_head", "embed"); returns what was frozen.

    With tied embeddings the two are one tensor: freezing either freezes both (logged).
    """
    parts = list(dict.fromkeys(parts))
    unknown = [p for p in parts if p not in FREEZABLE]
    if unknown:
        raise VocabdriftError(f"cannot freeze {unknown[0]!r}; choose from {', '.join(FREEZABLE)}")
    done = []
    for p in parts:
        mod = model.get_output_embeddings() if p == "lm_head" else model.get_input_embeddings()
        if mod is None:
            raise VocabdriftError(f"{type(model).__name__} has no {p} to freeze")
        mod.weight.requires_grad_(False)
        done.append(p)
    if done and _is_tied(model) and len(done) == 1:
        log.info("lm_head and the embeddings are tied: freezing %s freezes both", done[0])
    return done


def replay_mix(records: Sequence[dict[str, Any]], replay: Sequence[dict[str, Any]], ratio: float, *,
               seed: int = 0) -> list[dict[str, Any]]:
    """Blend plain-text replay records into SFT records so they make up `ratio` of the result, shuffled.

    `replay` records are `{"text": ...}` (trained with a language-modelling loss on every token); they are
    cycled if there are too few. Deterministic for a given seed.

    Example:
        >>> mixed = replay_mix(sft_records, [{"text": t} for t in pretrain_texts], 0.1)
    """
    if not 0.0 <= ratio < 1.0:
        raise VocabdriftError(f"the replay ratio must be in [0, 1), not {ratio}")
    if ratio == 0.0:
        return list(records)
    if not replay:
        raise VocabdriftError("replay_ratio > 0 but the replay data is empty")
    bad = next((i for i, r in enumerate(replay) if not isinstance(r.get("text"), str)), None)
    if bad is not None:
        raise VocabdriftError(f"replay record {bad} has no \"text\" string; replay data is plain pre-training text")
    k = round(len(records) * ratio / (1.0 - ratio))
    rng = random.Random(seed)
    order = list(range(len(replay)))
    rng.shuffle(order)
    extra = [replay[order[i % len(order)]] for i in range(k)]
    mixed = list(records) + extra
    rng.shuffle(mixed)
    return mixed


# ---- plugging into a plain Trainer ----------------------------------------------------------------------------

class LossTermsMixin:
    """Add `loss_terms` to any `transformers.Trainer` subclass (TRL's `SFTTrainer` too).

    Each term is called with (model, inputs) before the model's forward pass of each micro-batch, and its
    result (if not None) is added to the loss. `class MySFT(LossTermsMixin, SFTTrainer): pass`.

    With gradient accumulation a term is added to every micro-batch's loss; when the Trainer does not divide
    the loss by the accumulation steps itself (models that take `num_items_in_batch`), divide λ by them.
    """

    def __init__(self, *args: Any, loss_terms: Sequence[Any] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_terms = list(loss_terms)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        base = getattr(model, "module", model)  # DDP/DeepSpeed wrap the model
        extra = [t(base, inputs) for t in self.loss_terms]
        res = super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                   num_items_in_batch=num_items_in_batch)
        loss, outputs = res if return_outputs else (res, None)
        for e in extra:
            if e is not None:
                loss = loss + e.to(loss.device)
        return (loss, outputs) if return_outputs else loss


def _anchored_trainer() -> type:
    from transformers import Trainer

    class AnchoredTrainer(LossTermsMixin, Trainer):
        """A `transformers.Trainer` that adds `loss_terms=[LmHeadAnchor(...), RowGate(), ...]` to the loss."""

    return AnchoredTrainer


def __getattr__(name: str) -> Any:
    if name == "AnchoredTrainer":  # built on first use: importing this module stays free of transformers
        cls = _anchored_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
