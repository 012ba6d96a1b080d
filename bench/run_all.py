"""Run the benchmarks in turn, each in its own process, and say which finished (`make bench`).

    python bench/run_all.py                  # every bench/*.py but this one, in name order
    python bench/run_all.py diff_bench probe_prefix -- --repeat 1    # some of them, with arguments for each

Each script prints its own table (see bench/README.md for what they measure and what their numbers mean); this
runner only starts them one after another, so they never compete for the machine's cores, and exits non-zero when
any failed. Several build large inputs the first time (diff_bench writes about 9 GB under bench/out/).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts() -> list[str]:
    """The benchmark scripts: every bench/*.py but this runner."""
    return sorted(p.stem for p in HERE.glob("*.py") if p.name != Path(__file__).name)


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help=f"scripts to run (default: all of {', '.join(scripts())})")
    args = ap.parse_args(argv)
    names = [n.removesuffix(".py") for n in args.names] or scripts()
    unknown = [n for n in names if n not in scripts()]
    if unknown:
        ap.error(f"no such benchmark: {', '.join(unknown)}; choose from {', '.join(scripts())}")
    results: list[tuple[str, int, float]] = []
    for name in names:
        print(f"==> bench/{name}.py {' '.join(extra)}".rstrip(), flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *extra])
        results.append((name, code, time.perf_counter() - t0))
    print("\nbenchmark                 exit   seconds")
    for name, code, s in results:
        print(f"{name:<25} {code:>4} {s:>9.0f}")
    return 1 if any(code for _, code, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
