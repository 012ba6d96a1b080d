"""Training-side remedies on a tiny Llama with a plain Trainer: anchor, gating, freezing, replay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import TokenData, load, row_cos, tiny_llama, trainer

from vocabdrift.composites.remedies import (
    LmHeadAnchor,
    RowGate,
    freeze,
    rarity_weights,
    replay_mix,
    target_ids,
)
from vocabdrift.errors import VocabdriftError

FREQUENT = list(range(3, 120))  # the tokens the training data uses; ids >= 120 never appear
RARE = 250


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("base") / "m")


def _head(model: torch.nn.Module) -> np.ndarray:
    return model.get_output_embeddings().weight.detach().double().numpy().copy()


def test_target_ids_shift_and_mask() -> None:
    labels = torch.tensor([[-100, -100, 5, 6], [7, -100, 8, -100]])
    assert sorted(target_ids({"labels": labels, "input_ids": labels}).tolist()) == [5, 6, 8]
    ids = torch.tensor([[1, 2, 3, 0]])
    got = target_ids({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0]])})
    assert got.tolist() == [2, 3]


@pytest.mark.slow
def test_anchor_keeps_rare_row_closer(base: Path, tmp_path: Path) -> None:
    """Unanchored, the push-down gradient turns the rare row; the anchor holds it nearer its base."""
    data = TokenData(FREQUENT, n=64)
    ref = _head(load(base))
    cos = {}
    for name, terms in (("plain", []), ("anchored", [LmHeadAnchor(weight=5.0)])):
        torch.manual_seed(0)
        m = load(base)
        trainer(m, data, tmp_path / name, steps=30, lr=1e-2, loss_terms=terms).train()
        cos[name] = row_cos(ref, _head(m))
    assert cos["plain"][RARE] < 0.95, cos["plain"][RARE]  # the setting really drifts the rare row
    assert cos["anchored"][RARE] > cos["plain"][RARE] + 0.02, (cos["anchored"][RARE], cos["plain"][RARE])
    # and it holds all never-seen rows, not just one
    unseen = np.arange(120, 300)
    assert cos["anchored"][unseen].mean() > cos["plain"][unseen].mean()


def test_anchor_value_equals_direct_sum(base: Path) -> None:
    m = load(base)
    counts = np.zeros(300)
    counts[:100] = 50
    anchor = LmHeadAnchor(weight=0.5, rarity=counts, floor=5.0)
    # the snapshot is taken at the first call: no distance yet
    assert float(anchor(m, {}).detach()) == pytest.approx(0.0, abs=1e-12)
    w = m.get_output_embeddings().weight
    with torch.no_grad():
        w[RARE] += 0.1
        w[7] += 0.1
    got = float(anchor(m, {}).detach())
    rw = rarity_weights(counts).numpy().astype(np.float64)
    h = w.shape[1]
    want = 0.5 * (rw[RARE] + rw[7]) * h * 0.01
    assert got == pytest.approx(want, rel=1e-4)
    assert rw[RARE] > rw[7]  # a never-seen token weighs more than a frequent one


def test_anchor_from_checkpoint_rejects_wrong_shape(base: Path, tmp_path: Path) -> None:
    other = tiny_llama(tmp_path / "other", hidden=16)
    with pytest.raises(VocabdriftError, match="anchor to the model's own base"):
        LmHeadAnchor(other, weight=1.0)(load(base), {})


def test_gate_zeroes_absent_rows_gradient(base: Path) -> None:
    m = load(base)
    gate = RowGate()
    batch = TokenData(FREQUENT[:20], n=4)[0]
    inputs = {k: v[None] for k, v in batch.items()}
    gate(m, inputs)
    m(**inputs).loss.backward()
    g = m.get_output_embeddings().weight.grad
    targets = set(target_ids(inputs).tolist())
    absent = [i for i in range(300) if i not in targets]
    assert torch.count_nonzero(g[absent]) == 0
    assert all(torch.count_nonzero(g[t]) > 0 for t in targets)
    assert gate.gated_rows == len(absent)


def test_gate_min_count_keeps_frequent_rows(base: Path) -> None:
    m = load(base)
    gate = RowGate(min_count=2)
    a = {k: v[None] for k, v in TokenData([5, 6, 7], n=1, seed=1)[0].items()}
    b = {k: v[None] for k, v in TokenData([8, 9], n=1, seed=2)[0].items()}
    gate(m, a)  # 5, 6, 7 become frequent
    gate(m, b)
    m(**b).loss.backward()
    g = m.get_output_embeddings().weight.grad
    seen_a = set(target_ids(a).tolist())
    frequent = [t for t in seen_a if (target_ids(a) == t).sum() >= 2]
    assert frequent, "the fixture batch should repeat a token"
    assert all(torch.count_nonzero(g[t]) > 0 for t in frequent)  # frequent, absent from b: still pushed down
    assert torch.count_nonzero(g[RARE]) == 0  # rare and absent: gated


@pytest.mark.slow
def test_gate_leaves_absent_rows_unchanged_in_training(base: Path, tmp_path: Path) -> None:
    data = TokenData(FREQUENT, n=64)
    ref = _head(load(base))
    after = {}
    for name, terms in (("plain", []), ("gated", [RowGate()])):
        m = load(base)
        trainer(m, data, tmp_path / name, steps=10, lr=1e-2, loss_terms=terms).train()
        after[name] = _head(m)
    unseen = np.arange(120, 300)
    assert np.abs(after["plain"][unseen] - ref[unseen]).max() > 1e-3  # without the gate they move
    np.testing.assert_array_equal(after["gated"][unseen], ref[unseen])  # with it, not at all
    assert np.abs(after["gated"][FREQUENT] - ref[FREQUENT]).max() > 1e-3  # the targets still train


def test_freeze(base: Path) -> None:
    m = load(base)
    assert freeze(m, ["lm_head"]) == ["lm_head"]
    assert not m.get_output_embeddings().weight.requires_grad
    assert m.get_input_embeddings().weight.requires_grad
    freeze(m, ["embed"])
    assert not m.get_input_embeddings().weight.requires_grad
    with pytest.raises(VocabdriftError, match="choose from"):
        freeze(m, ["norm"])


def test_replay_mix_ratio_and_determinism() -> None:
    sft = [{"messages": [{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}]}
           for i in range(90)]
    replay = [{"text": f"t{i}"} for i in range(4)]
    mixed = replay_mix(sft, replay, 0.1, seed=3)
    n_replay = sum("text" in r for r in mixed)
    assert n_replay == 10 and len(mixed) == 100  # 10% of the mix
    assert mixed == replay_mix(sft, replay, 0.1, seed=3)
    assert mixed != replay_mix(sft, replay, 0.1, seed=4)
    assert replay_mix(sft, replay, 0.0) == sft
    with pytest.raises(VocabdriftError, match="text"):
        replay_mix(sft, [{"messages": []}], 0.1)
    with pytest.raises(VocabdriftError, match="ratio"):
        replay_mix(sft, replay, 1.0)


def _penalty_of_moving(anchor: LmHeadAnchor, model: torch.nn.Module, row: int, inputs: dict) -> float:
    w = model.get_output_embeddings().weight
    with torch.no_grad():
        w[row] += 0.1
    p = float(anchor(model, inputs).detach())
    with torch.no_grad():
        w[row] -= 0.1
    return p


def test_anchor_rarity_online_and_from_coverage(base: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = load(base)
    labels = torch.tensor([[-100] + [5] * 10])
    batch = {"input_ids": labels.clamp_min(0), "labels": labels}
    online = LmHeadAnchor(weight=1.0, rarity="online")
    online(m, batch)  # snapshot, and token 5 seen ten times as a target
    assert _penalty_of_moving(online, m, RARE, {"labels": labels[:, :1], "input_ids": labels[:, :1]}) > \
        2 * _penalty_of_moving(online, m, 5, {"labels": labels[:, :1], "input_ids": labels[:, :1]})
    # the same weighting from a coverage run's table (ids past its end count as never seen)
    pq.write_table(pa.table({"token_id": np.arange(200), "count": np.where(np.arange(200) == 5, 1000, 0),
                             "samples": np.zeros(200, dtype=np.int64)}), tmp_path / "coverage.parquet")
    cov = LmHeadAnchor(weight=1.0, rarity=tmp_path)
    cov(m, {})
    assert _penalty_of_moving(cov, m, RARE, {}) > 50 * _penalty_of_moving(cov, m, 5, {})
    with pytest.raises(VocabdriftError, match="vocabdrift coverage"):
        LmHeadAnchor(weight=1.0, rarity=tmp_path / "nowhere")(load(base), {})
