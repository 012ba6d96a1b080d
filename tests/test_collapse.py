"""Collapsed rows (issue 21): groups found by hashing and confirmed by cosine equal a brute-force V x V computation
on small vocabularies with planted groups."""

from __future__ import annotations

import numpy as np
import pytest

from vocabdrift.analyses.collapse import collapse_change, collapse_summary, collapsed_groups


def _brute(x: np.ndarray, min_cos: float) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of cos >= min_cos over every pair, zero rows one group: (group, size) as the module's."""
    from scipy.sparse.csgraph import connected_components

    norm = np.linalg.norm(x, axis=1)
    zero = norm == 0
    u = x / np.where(zero, 1, norm)[:, None]
    adj = (u @ u.T) >= min_cos
    adj[np.ix_(zero, zero)] = True
    adj[zero] &= zero
    adj[:, zero] &= zero[:, None]
    _, label = connected_components(adj, directed=False)
    counts = np.bincount(label)
    size = counts[label]
    first = np.array([np.flatnonzero(label == lab)[0] for lab in label])
    return np.where(size >= 2, first, -1), np.where(size >= 2, size, 0)


def _planted(v: int, h: int, groups: list[int], *, seed: int, shared: float = 0.0, zeros: int = 0
             ) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((v, h)).astype(np.float32)
    x += shared * rng.standard_normal(h).astype(np.float32)  # a direction every row shares, as in real models
    ids = rng.permutation(v)
    planted, at = [], 0
    for g in groups:
        members = np.sort(ids[at:at + g])
        at += g
        c = rng.standard_normal(h).astype(np.float32)
        scale = rng.uniform(0.5, 2.0, (g, 1)).astype(np.float32)  # same direction, any norm
        x[members] = scale * (c + 1e-3 * rng.standard_normal((g, h)).astype(np.float32))
        planted.append(members)
    x[ids[at:at + zeros]] = 0
    return x, planted


def _blocks(x: np.ndarray, step: int):  # noqa: ANN202
    return lambda: ((s, x[s:s + step]) for s in range(0, len(x), step))


@pytest.mark.parametrize(("shared", "zeros"), [(0.0, 0), (3.0, 5)], ids=["isotropic", "shared-direction+zeros"])
def test_groups_equal_brute_force(shared: float, zeros: int) -> None:
    x, planted = _planted(3000, 48, [2, 3, 17, 250], seed=0, shared=shared, zeros=zeros)
    c = collapsed_groups(_blocks(x, 700), min_cos=0.999)
    group, size = _brute(x, 0.999)
    np.testing.assert_array_equal(c.group, group)
    np.testing.assert_array_equal(c.size, size)
    for m in planted:
        assert (c.group[m] == m.min()).all() and (c.size[m] == len(m)).all()
    assert c.groups() == len(planted) + (zeros >= 2)


def test_large_bucket_is_split_and_still_exact(monkeypatch) -> None:
    import vocabdrift.analyses.collapse as C

    monkeypatch.setattr(C, "_MAX_BUCKET", 64)
    x, _ = _planted(2000, 32, [40, 300], seed=2, shared=6.0)
    c = collapsed_groups(_blocks(x, 512), min_cos=0.999, bits=4)  # few bits: large buckets on purpose
    group, size = _brute(x, 0.999)
    np.testing.assert_array_equal(c.size, size)
    np.testing.assert_array_equal(c.group, group)


def test_summary_and_change_between_checkpoints() -> None:
    x, planted = _planted(1000, 32, [5, 30], seed=1)
    post = x.copy()
    new = np.setdiff1d(np.arange(1000), np.concatenate(planted))[:12]
    post[new] = post[planted[1][0]] * 1.5  # twelve rows join the second group during post-training
    cb = collapsed_groups(_blocks(x, 256), min_cos=0.999)
    cp = collapsed_groups(_blocks(post, 256), min_cos=0.999)
    ch = collapse_change(cb, cp)
    assert sorted(np.flatnonzero(ch["new"]).tolist()) == sorted(new.tolist())
    assert ch["already"].sum() == 35 and not ch["released"].any()
    cats = np.array(["latin"] * 1000, dtype=object)
    cats[planted[1]] = "thai"
    s = collapse_summary(cp, cats)
    assert s["rows"] == 47 and s["groups"] == 2 and s["largest"][0]["size"] == 42
    assert s["categories"]["thai"] == {"tokens": 30, "collapsed": 30}
    assert s["categories"]["latin"]["collapsed"] == 17
