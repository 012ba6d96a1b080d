"""A tiny Llama and a plain `transformers.Trainer` on random token data, for the callback and remedy tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def tiny_llama(path: Path, *, vocab: int = 300, hidden: int = 32, seed: int = 0) -> Path:
    """A random LlamaForCausalLM (untied, float32) saved with save_pretrained; no tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=64)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load(path: Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype="float32")


class TokenData:
    """Random sequences over `ids`; the labels mask the first half of each sequence (a 'prompt')."""

    def __init__(self, ids: Sequence[int], *, n: int = 64, length: int = 16, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.rows = [rng.choice(np.asarray(ids), size=length).tolist() for _ in range(n)]
        self.length = length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        ids = torch.tensor(self.rows[i])
        labels = ids.clone()
        labels[: self.length // 2] = -100
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def trainer(model: Any, data: TokenData, out: Path, *, steps: int, lr: float, weight_decay: float = 0.0,
            callbacks: Sequence[Any] = (), loss_terms: Sequence[Any] = (), optim: str = "adamw_torch") -> Any:
    """A plain Trainer (or the AnchoredTrainer when loss terms are given), CPU, no reporting, no checkpoints."""
    from transformers import Trainer, TrainingArguments

    from vocabdrift.composites.remedies import AnchoredTrainer

    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=lr, weight_decay=weight_decay, lr_scheduler_type="constant",
                             warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0, optim=optim)
    if loss_terms:
        return AnchoredTrainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks),
                               loss_terms=list(loss_terms))
    return Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))


def row_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
