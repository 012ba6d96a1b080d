"""The whole vocabulary's say-ability map of the README's quickstart pair, against `probe` as it was, in one run.

    python bench/saymap_real.py [--work /tmp/vdq] [--sample 600] [--vs OTHER_SRC] [--out FILE]

WORK holds the quickstart pair (bench/quickstart_pair.py): `base`, `train/model` (POST) and `run` (a diff). Three
whole processes, one after another on the same machine:

1. the baseline: `probe POST --base BASE` on `--sample` seeded tokens, every default template (four), with `--vs
   OTHER_SRC` on PYTHONPATH (a checkout of the code before the map, e.g. `git worktree add /tmp/old f0837b0` and
   `--vs /tmp/old/src`; without it, this checkout's `probe`), timed and projected to every token;
2. the map: `saymap POST --base BASE` on every non-special token, timed;
3. the agreement: on the sample, each model's verdict (sayable under some template the map read: all but those
   POST stopped following, probe's template rule) from the full probe against the map's.

The ratio is the projected baseline over the map. It also prints the map's work per token (templates asked, the
verdicts asked again exactly) and projects a 7B model's 152K-token map on one GPU from it: the prompts a map asks
times the FLOPs of a prompt, over a stated sustained throughput (a projection, not a measurement: no GPU here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

BASELINE = """
import json, sys, numpy as np
from vocabdrift.api.probe import probe
ids = json.loads(sys.argv[3])
r = probe(sys.argv[1], base=sys.argv[2], tokens=ids, out=sys.argv[4], control=0, force=True)
rows = r.table.select(["model", "template", "token_id", "sayable"]).to_pylist()
json.dump(rows, open(sys.argv[5], "w"))
"""

MAP = """
import json, sys
from vocabdrift.api.saymap import saymap
r = saymap(sys.argv[1], base=sys.argv[2], out=sys.argv[3], force=True, progress="lines")
s = dict(r.summary)
s["timings"] = r.timings
json.dump(s, open(sys.argv[4], "w"))
"""


def timed(code: str, args: list[str], src: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], env=env, check=True)
    return time.perf_counter() - t


def flops_per_prompt(layers: int, hidden: int, inter: int, heads: int, kv_heads: int, vocab: int,
                     positions: float) -> float:
    """Forward FLOPs of one probe prompt's tail: `positions` through every layer's projections and MLP, the
    lm_head at one position (attention over a short context is small beside them)."""
    head = hidden // heads
    per_layer = 2 * (hidden * hidden * 2 + hidden * kv_heads * head * 2 + 3 * hidden * inter)
    return positions * layers * per_layer + 2 * hidden * vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vdq"))
    ap.add_argument("--sample", type=int, default=600)
    ap.add_argument("--vs", type=Path, default=None, help="the baseline's src folder (default: this checkout's)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here too")
    ap.add_argument("--gpu-tflops", type=float, default=125.0,
                    help="sustained bf16 TFLOP/s assumed for the projection (40%% of an A100's 312)")
    a = ap.parse_args()
    import numpy as np

    base, post = a.work / "base", a.work / "train" / "model"
    sys.path.insert(0, str(SRC))
    from vocabdrift.sources.tokenizer import load_tokenizer

    tok = load_tokenizer(str(post))  # every non-special token, as the map takes them
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    every = [i for i in range(len(tok)) if i not in special]
    rng = np.random.default_rng(0)
    sample = sorted(int(x) for x in rng.choice(every, size=min(a.sample, len(every)), replace=False))
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        t_probe = timed(BASELINE, [str(post), str(base), json.dumps(sample), str(t / "probe"), str(t / "p.json")],
                        a.vs or SRC)
        t_map = timed(MAP, [str(post), str(base), str(t / "map"), str(t / "m.json")], SRC)
        summary = json.loads((t / "m.json").read_text())
        full: dict[str, bool] = {}  # each model's verdict over the templates the map read (probe's template rule)
        for x in json.loads((t / "p.json").read_text()):
            k = f"{x['model']}:{x['token_id']}"
            full[k] = full.get(k, False) or (bool(x["sayable"]) and x["template"] in summary["templates"][x["model"]])
        import pyarrow.parquet as pq

        m = pq.read_table(t / "map" / "saymap.parquet").to_pylist()
    got = {f"{k}:{r['token_id']}": r[f"{k}_sayable"] for r in m for k in ("base", "post")}
    agree = sum(got[k] == v for k, v in full.items())
    projected = t_probe * len(every) / len(sample)
    asked = {k: v / len(every) for k, v in summary["asked"].items()}
    exact = {k: v / len(every) for k, v in summary["exact"].items()}
    # a 7B model's 152K vocabulary (Qwen2.5-7B: 28 layers, 3584 wide, 18944 MLP, 28 heads, 4 kv heads), asked as
    # many prompts per token as this map asked, 6.5 positions a prompt (the chat templates' tails)
    per = flops_per_prompt(28, 3584, 18944, 28, 4, 152064, 6.5)
    prompts = 152064 * sum(asked.values())
    gpu_s = prompts * per / (a.gpu_tflops * 1e12)
    res = {"tokens": len(every), "sample": len(sample), "baseline_s_sample": round(t_probe, 1),
           "baseline_projected_min": round(projected / 60, 1), "map_min": round(t_map / 60, 2),
           "ratio": round(projected / t_map, 1), "agree": agree, "compared": len(full),
           "asked_per_token": {k: round(v, 2) for k, v in asked.items()},
           "asked_again_exactly_per_token": {k: round(v, 3) for k, v in exact.items()},
           "margin": summary.get("margin"), "audit": summary.get("audit"), "counts": summary.get("counts"),
           "templates": summary.get("templates"), "template_failures": summary.get("template_failures"),
           "map_timings": summary.get("timings"), "gpu_projection_7b_152k_min": round(gpu_s / 60, 1),
           "gpu_tflops_assumed": a.gpu_tflops, "baseline_src": str(a.vs or SRC)}
    print(json.dumps(res, indent=2))
    print(f"\n| baseline probe, {len(sample)} tokens x 2 models x 4 templates | {t_probe:.0f} s "
          f"(projected to {len(every):,} tokens: {projected / 60:.0f} min) |")
    print(f"| saymap, {len(every):,} tokens x 2 models | {t_map / 60:.1f} min ({projected / t_map:.1f}x) |")
    print(f"| verdicts equal to the full probe's | {agree}/{len(full)} |")
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
