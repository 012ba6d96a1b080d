"""Why the lab runs its two SFT chains side by side on one thread each: two SFTs of the lab's quick model, timed
three ways in one process (TRL imported before any clock starts):

- **two threads, one after the other**: what the lab did before;
- **one thread, one after the other**: the lab's fallback where it cannot fork (a GPU, a single core);
- **side by side**: `lab._Stages.run_side_by_side`, each SFT in a forked worker on one thread.

It prints each way's seconds and its speed against the first, and checks that the last two trained the same
weights (the thread count, not the forking, decides the numbers).

    python bench/lab_threads.py [--steps 100]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars, before it is imported


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()

    import numpy as np
    import torch
    import trl.trainer.sft_trainer  # noqa: F401  (imported before the clocks start)
    from safetensors.numpy import load_file
    from sft_step import make_base

    from vocabdrift.composites.corpus import build_corpus
    from vocabdrift.composites.lab import QUICK, _Stages
    from vocabdrift.composites.train import sft
    from vocabdrift.device import cpu_threads

    records = build_corpus(docs=10, sft=600, seed=0, name_every=0).sft
    with tempfile.TemporaryDirectory(prefix="vocabdrift-bench-") as d:
        work = Path(d)
        make_base(work)

        def stage(root: Path, seed: int):
            def go(progress: bool) -> None:
                sft(work / "base", records, out=root / f"m{seed}", steps=args.steps, lr=5e-4, betas=(0.9, 0.95),
                    batch_size=8, seed=seed, progress=False)
            return f"sft{seed}", go, f"sft {seed}"

        def timed(name: str, run) -> float:
            root = work / name
            root.mkdir()
            t = time.perf_counter()
            run(root)
            return time.perf_counter() - t

        def sequential(threads: int):
            def run(root: Path) -> None:
                with cpu_threads(threads):
                    for seed in (0, 1):
                        stage(root, seed)[1](False)
            return run

        def side_by_side(root: Path) -> None:
            _Stages(root, QUICK, 0, progress=False).run_side_by_side([[stage(root, 0)], [stage(root, 1)]])

        print(f"two SFTs of {args.steps} steps each, the lab's quick model; torch threads: {torch.get_num_threads()}")
        secs = {"two threads, one after the other": timed("two", sequential(2)),
                "one thread, one after the other": timed("one", sequential(1)),
                "side by side, one thread each": timed("side", side_by_side)}
        ref = next(iter(secs.values()))
        for name, s in secs.items():
            print(f"{name:36s} {s:7.1f} s   x{ref / s:.2f}")
        same = all(np.array_equal(load_file(work / "one" / f"m{k}" / "model.safetensors")[n], v)
                   for k in (0, 1) for n, v in load_file(work / "side" / f"m{k}" / "model.safetensors").items())
        print("side by side trains the same weights as one thread, one after the other:", same)


if __name__ == "__main__":
    main()
