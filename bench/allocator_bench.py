"""What `device.keep_freed_memory()` saves on a CPU training step: the lab's models, glibc defaults against kept memory.

Each setting runs in its own process (the allocator setting cannot be undone inside one), one after the other,
on the same model, batch and seed; the script prints each one's time per step, page faults per step and kernel
time, and the ratio.

    python bench/allocator_bench.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SIZES = {"quick": (2048, 64, 2, 64), "default": (4096, 96, 3, 128)}  # vocabulary, hidden, layers, context


def one(size: str, keep: bool, steps: int) -> dict[str, float]:
    """One process: a tiny Llama as the lab builds it, AdamW steps on a fixed batch of 16 rows."""
    import resource
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vocabdrift.device import keep_freed_memory

    if keep:
        assert keep_freed_memory()
    v, h, layers, ctx = SIZES[size]
    cfg = LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=h * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, v, (16, ctx + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):  # warm-up
        step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    return {"ms_per_step": 1000 * (t1 - t0) / steps, "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
            "kernel_s": r1.ru_stime - r0.ru_stime}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.child[0], a.child[1] == "keep", a.steps)))
        return
    for size in SIZES:
        res = {}
        for mode in ("default", "keep"):
            out = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--child", size, mode],
                                 capture_output=True, text=True, check=True).stdout
            res[mode] = json.loads(out.strip().splitlines()[-1])
            r = res[mode]
            print(f"{size:8s} {mode:8s} {r['ms_per_step']:7.1f} ms/step  {r['faults_per_step']:8.0f} faults/step  "
                  f"{r['kernel_s']:5.2f} s kernel")
        print(f"{size:8s} speed-up {res['default']['ms_per_step'] / res['keep']['ms_per_step']:.2f}x")


if __name__ == "__main__":
    main()
