"""`device.keep_freed_memory`: after it, a training step's freed tensors are reused instead of faulted in again."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest

CHILD = """
import resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from vocabdrift.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
cfg = LlamaConfig(vocab_size=4096, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters())
x = torch.randint(0, 4096, (16, 129))
per_step = []
for i in range(10):  # the lab's default step shape: 16 x 128 tokens, a 4,096-token vocabulary
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(*per_step[2:])  # the first steps fault the arena in
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_the_page_faults_of_training_steps() -> None:
    faults = {}
    for mode in ("default", "keep"):
        r = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        faults[mode] = statistics.median(float(f) for f in r.stdout.split())
    logits_pages = 16 * 128 * 4096 * 4 // 4096  # one step's logits alone
    assert faults["default"] > logits_pages  # glibc hands large blocks back: each step faults them in again
    # kept: a typical step reuses what the last one freed (now and then the heap still grows by one block, so the
    # median step, not the mean of a few, is the steady state)
    assert faults["keep"] < 0.1 * faults["default"], faults
