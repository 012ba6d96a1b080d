"""What `train.score_trained_positions_only` saves on a CPU SFT step: the lab's quick model and SFT data, TRL's
fused LM head scoring every position (its own choice off CUDA) against scoring the trained positions only.

Each setting runs in its own process after importing TRL (so neither pays the import), on the same model, data and
seed; the script prints each one's seconds per step, the ratio, and how far apart the two trained lm_heads are.

    python bench/sft_step.py [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(mode: str, steps: int, work: Path) -> dict[str, float]:
    import contextlib

    import numpy as np
    import trl.trainer.utils  # noqa: F401  (imported before the clock starts)
    from safetensors.numpy import load_file

    import vocabdrift.composites.train as T
    from vocabdrift.composites.corpus import build_corpus

    if mode == "every_position":
        T.score_trained_positions_only = contextlib.nullcontext
    records = build_corpus(docs=10, sft=600, seed=0, name_every=0).sft
    out = work / mode
    t = time.perf_counter()
    T.sft(work / "base", records, out=out, steps=steps, lr=5e-4, betas=(0.9, 0.95), batch_size=8, progress=False)
    dt = time.perf_counter() - t
    w = load_file(out / "model.safetensors")["lm_head.weight"]
    np.save(work / f"{mode}.npy", w)
    return {"mode": mode, "seconds": dt, "ms_per_step": 1000 * dt / steps}


def make_base(work: Path) -> None:
    """The lab's quick shapes (2,048-token BPE, hidden 64, 2 layers), pre-trained for a few steps only."""
    from vocabdrift.composites.corpus import build_corpus
    from vocabdrift.composites.train import pretrain, train_tokenizer

    c = build_corpus(docs=2500, sft=10, seed=0, name_every=400)
    tok = train_tokenizer(c.pretrain, vocab_size=2048)
    pretrain(tok, c.pretrain, out=work / "base", steps=20, hidden=64, layers=2, heads=4, context=64, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "WORK"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.child[0], args.steps, Path(args.child[1]))))
        return
    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        make_base(work)
        res = {}
        for mode in ("every_position", "trained_positions"):
            r = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", mode, str(work)],
                               capture_output=True, text=True, check=True)
            res[mode] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{mode:<18} {res[mode]['ms_per_step']:7.1f} ms/step")
        gap = float(np.abs(np.load(work / "every_position.npy") - np.load(work / "trained_positions.npy")).max())
    speed = res["every_position"]["seconds"] / res["trained_positions"]["seconds"]
    print(f"speed-up {speed:.2f}x; largest lm_head difference after {args.steps} steps: {gap:.1e}")


if __name__ == "__main__":
    main()
