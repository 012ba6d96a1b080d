"""The small commands a user runs by the dozen, timed as whole processes: `neighbors`, `check --run`,
`prune-suggest`, `report`, `vocab` (from its cache) and `--help`, each against `python -c pass` in the same run.

    python bench/small_commands.py [--work /tmp/vdq] [--repeat 7] [--vs OTHER_SRC]

WORK holds the README's quickstart pair (bench/quickstart_pair.py, or `recipe_real.py --pair quickstart`): `base`,
`train/model` (POST) and `run` (diff, coverage and probe). `--vs` times the same commands with another checkout's
`src` on PYTHONPATH (e.g. a `git worktree` of an older commit) interleaved with this one, so both see the same
machine load; the table then gives the ratio, old over new, pair by pair. Timings are medians of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def commands(work: Path, scratch: Path) -> dict[str, list[str]]:
    base, post, run = work / "base", work / "train" / "model", work / "run"
    report_run = scratch / "run"  # a copy: report writes into the folder it reads
    shutil.copytree(run, report_run, dirs_exist_ok=True)
    vd = ["-m", "vocabdrift.cli"]
    return {
        "python -c pass": ["-c", "pass"],
        "vocabdrift --help": [*vd, "--help"],
        "neighbors POST ' Jack' --base BASE": [*vd, "neighbors", str(post), " Jack", "--base", str(base), "-q"],
        "neighbors POST ' Jack'": [*vd, "neighbors", str(post), " Jack", "-q"],
        "check --run RUN": [*vd, "check", "--run", str(run), "-q", "--max-lost", "none"],
        "prune-suggest --run RUN": [*vd, "prune-suggest", "--run", str(run), "-q"],
        "report --run RUN": [*vd, "report", "--run", str(report_run), "-q"],
        "vocab BASE (cached)": [*vd, "vocab", str(base), "-o", str(scratch / "v"), "-q"],
    }


def once(args: list[str], src: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode not in (0, 1):  # check exits 1 when it fails the run: still a timing
        raise SystemExit(f"{' '.join(args)} exited {p.returncode}: {p.stderr[-500:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vdq"))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--vs", type=Path, help="another checkout's src folder, timed interleaved with this one")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(a.work, Path(tmp))
        for args in cmds.values():  # warm the page cache and vocabdrift's vocabulary cache once, untimed
            once(args, SRC)
            if a.vs:
                once(args, a.vs)
        times: dict[str, list[float]] = {k: [] for k in cmds}
        old: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(a.repeat):
            for k, args in cmds.items():
                times[k].append(once(args, SRC))
                if a.vs:
                    old[k].append(once(args, a.vs))
    floor = statistics.median(times["python -c pass"])
    head = "| command | median wall (s) | over `python -c pass` (s) |"
    head += " before (s) | before / now |" if a.vs else ""
    print(head)
    print("| --- | ---: | ---: |" + (" ---: | ---: |" if a.vs else ""))
    for k, ts in times.items():
        m = statistics.median(ts)
        row = f"| `{k}` | {m:.2f} | {m - floor:.2f} |"
        if a.vs:
            mo = statistics.median(old[k])
            ratios = [o / n for o, n in zip(old[k], ts, strict=True)]
            row += f" {mo:.2f} | {statistics.median(ratios):.2f}x |"
        print(row)


if __name__ == "__main__":
    main()
