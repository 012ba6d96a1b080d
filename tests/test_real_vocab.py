"""What a real vocabulary holds (issue 21): GGUF token types, padding rows past the tokenizer, reserved names, and
neighbour intrusion, on models written in the test and on the real SmolLM2 GGUF."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from factory import make_llama, plant_drift, train_bpe

import vocabdrift
from vocabdrift.analyses.vocab import GGUF_BYTE, GGUF_CONTROL, GGUF_UNUSED, RESERVED_NAMES, reserved_ids

N_PAD = 8  # Qwen-style "[PADn]" rows of type UNUSED at the end of the GGUF's vocabulary
ODD = {"unused": "qqq", "control": "zzcontrol", "byte": "bytelike"}  # ordinary-looking names with other types


def _write_gguf(path: Path, *, seed: int = 0, moved: dict[int, np.ndarray] | None = None) -> dict[str, object]:
    """A tiny Llama GGUF whose tokenizer (a byte-level BPE trained here) carries token types: its specials CONTROL,
    three ordinary-looking tokens UNUSED / CONTROL / BYTE, and N_PAD `[PADn]` tokens UNUSED, like a Qwen GGUF."""
    import gguf

    tj = json.loads(train_bpe(path.parent / f"{path.stem}-tok").read_text())
    toks: list[str] = [""] * len(tj["model"]["vocab"])
    for t, i in tj["model"]["vocab"].items():
        toks[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    types = [1] * len(toks)
    for a in tj["added_tokens"]:
        types[a["id"]] = GGUF_CONTROL
    odd = {}
    for kind, name, t in (("unused", ODD["unused"], GGUF_UNUSED), ("control", ODD["control"], GGUF_CONTROL),
                          ("byte", ODD["byte"], GGUF_BYTE)):
        odd[kind] = len(toks)
        toks.append(name)
        types.append(t)
    pad = list(range(len(toks), len(toks) + N_PAD))
    toks += [f"[PAD{i}]" for i in pad]
    types += [GGUF_UNUSED] * N_PAD
    v, h = len(toks), 32
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((v, h)).astype(np.float32)
    out = rng.standard_normal((v, h)).astype(np.float32)
    for r, row in (moved or {}).items():
        out[r] = row
    w.add_tensor("token_embd.weight", emb)
    w.add_tensor("output.weight", out)
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"rows": v, "pad": pad, "odd": odd, "specials": [a["id"] for a in tj["added_tokens"]]}


@pytest.fixture(scope="module")
def typed_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("typed")
    facts = _write_gguf(root / "m.gguf")
    return root / "m.gguf", facts


def test_gguf_token_types_decide_the_category(typed_gguf: tuple[Path, dict]) -> None:
    from vocabdrift.sources.vocabulary import vocab_table

    path, facts = typed_gguf
    t = vocab_table(path)
    cats, special = t.column("category").to_pylist(), t.column("is_special").to_pylist()
    reach = t.column("reachable").to_pylist()
    assert t.num_rows == facts["rows"]
    for i in facts["pad"]:  # "[PADn]" of type UNUSED: never latin, never ordinary
        assert (cats[i], special[i], reach[i]) == ("unused", True, False)
    assert (cats[facts["odd"]["unused"]], special[facts["odd"]["unused"]]) == ("unused", True)
    assert (cats[facts["odd"]["control"]], special[facts["odd"]["control"]]) == ("special", True)
    assert (cats[facts["odd"]["byte"]], special[facts["odd"]["byte"]]) == ("byte", False)
    assert all(cats[i] == "special" for i in facts["specials"])
    assert t.column("token_type").to_pylist()[facts["pad"][0]] == GGUF_UNUSED


def test_gguf_unused_rows_stay_out_of_overall_and_are_counted(typed_gguf: tuple[Path, dict], tmp_path: Path) -> None:
    path, facts = typed_gguf
    post = tmp_path / "post.gguf"
    _write_gguf(post, seed=1)
    run = vocabdrift.diff(path, post, out=tmp_path / "run", neighbors_top=0)
    s = json.loads((run / "summary.json").read_text())
    assert s["unused_rows"] == N_PAD + 1 and s["padding_rows"] == 0
    assert "latin" not in {c for i, c in enumerate(pq.read_table(run / "vocab.parquet").column("category")
                                                   .to_pylist()) if i in facts["pad"]}
    n_special = len(facts["specials"]) + 1 + N_PAD + 1  # specials, the odd CONTROL, the UNUSED ones
    assert s["overall"]["lm_head"]["tokens"] == facts["rows"] - n_special
    assert s["categories"]["unused"]["lm_head"]["tokens"] == N_PAD + 1


def test_rows_past_the_tokenizer_are_padding(tmp_path: Path) -> None:
    """A safetensors checkpoint with more matrix rows than tokenizer entries (Qwen2.5: 151,936 rows, 151,665
    tokens): the extra rows are `padding`, out of `overall` and `reachable`, counted in the summary."""
    tj = json.loads(train_bpe(tmp_path / "tok").read_text())
    n_tok = len(tj["model"]["vocab"])
    base = make_llama(tmp_path / "base", vocab=n_tok + N_PAD, tokenizer_from=tmp_path / "tok")
    post = plant_drift(base, tmp_path / "post", rows={n_tok + 1: 0.9, 50: 0.5}, tensor_suffix="lm_head.weight")
    run = vocabdrift.diff(base, post, out=tmp_path / "run", neighbors_top=0)
    s = json.loads((run / "summary.json").read_text())
    v = pq.read_table(run / "vocab.parquet")
    cats = v.column("category").to_pylist()
    assert cats[n_tok:] == ["padding"] * N_PAD and "padding" not in cats[:n_tok]
    assert not any(v.column("reachable").to_pylist()[n_tok:])
    assert s["padding_rows"] == N_PAD
    n_special = len(tj["added_tokens"])
    assert s["overall"]["lm_head"]["tokens"] == n_tok - n_special  # the drifted padding row is not counted
    assert s["categories"]["padding"]["lm_head"]["below_0.95"] == 1
    assert s["reachable"]["lm_head"]["tokens"] <= n_tok - n_special
    # undertrained takes the padding rows as its reference, and a user adds ids to them
    r = vocabdrift.undertrained(base, verify=False)
    assert r.summary["reference"] == N_PAD and r.summary["padding_rows"] == N_PAD
    r2 = vocabdrift.undertrained(base, verify=False, unused=["5", "6"])
    assert r2.summary["reference"] == N_PAD + 2


def test_reserved_names_per_family_and_the_override() -> None:
    pieces = ["<|reserved_special_token_0|>", "<|reserved_special_token_250|>", "<unused0>", "<unused99>",
              "[PAD151665]", "<|extra_3|>", "unused", "reserved", "<|im_start|>", "Ġthe", "<unused>", "<SPECIAL_12>"]
    assert reserved_ids(pieces).tolist() == [0, 1, 2, 3, 4, 5, 11]  # full matches only: "unused" is a word
    assert reserved_ids(pieces, {"gemma": RESERVED_NAMES["gemma"]}).tolist() == [2, 3]
    assert reserved_ids(pieces, {}).tolist() == []


def test_undertrained_reference_from_gguf_types_and_overrides(typed_gguf: tuple[Path, dict]) -> None:
    path, facts = typed_gguf
    r = vocabdrift.undertrained(path, verify=False)
    ref = N_PAD + 1  # the [PADn] rows and the odd UNUSED token
    assert r.summary["reference"] == ref and r.summary["unused_rows"] == ref
    # the names table replaced by an empty one: the GGUF's UNUSED types alone still give the same rows
    assert vocabdrift.undertrained(path, verify=False, reserved_names={}).summary["reference"] == ref


def test_smollm2_gguf_controls_are_special_and_nothing_is_unused(smollm2_gguf: Path) -> None:
    from vocabdrift.sources.tokenizer import gguf_token_types
    from vocabdrift.sources.vocabulary import vocab_table

    types = gguf_token_types(smollm2_gguf)
    assert types is not None and len(types) == 49_152 and int((types == GGUF_CONTROL).sum()) == 17
    t = vocab_table(smollm2_gguf)
    cats = np.asarray(t.column("category").to_pylist())
    assert (cats[:17] == "special").all() and not np.isin(cats, ["unused", "padding"]).any()
    assert int(t.column("is_special").to_numpy(zero_copy_only=False).sum()) == 17
    assert t.column("token_type").to_pylist()[:18] == [GGUF_CONTROL] * 17 + [1]


# ---- neighbour intrusion --------------------------------------------------------------------------------------

def test_planted_intrusion_is_measured_in_the_summary_and_marked_by_neighbors(tmp_path: Path) -> None:
    """A word's lm_head row moved next to a cluster of special and byte rows: its neighbours in POST are the
    intruders (share 1), in BASE ordinary rows; the change is in summary.json, and `neighbors` marks them."""
    import torch
    from safetensors.torch import load_file, save_file

    from vocabdrift.outputs.console import neighbors_console_table
    from vocabdrift.sources.vocabulary import vocab_table

    base = make_llama(tmp_path / "base", dtype="float32")
    vt = vocab_table(base)
    cats = np.asarray(vt.column("category").to_pylist())
    word = int(np.flatnonzero(cats == "latin")[40])
    cluster = [*np.flatnonzero(cats == "special").tolist(), *np.flatnonzero(cats == "byte")[:7].tolist()]
    assert len(cluster) == 10
    g = torch.Generator().manual_seed(3)
    sd = load_file(base / "model.safetensors")
    lm = sd["lm_head.weight"].clone()
    c = torch.randn(lm.shape[1], generator=g) * float(lm.std()) * 3
    c -= (c @ lm[word]) / (lm[word] @ lm[word]) * lm[word]  # the word's BASE row is far from the cluster
    for i in cluster:  # the never-targeted rows share one direction, in both checkpoints
        lm[i] = c + 0.05 * float(lm.std()) * torch.randn(lm.shape[1], generator=g)
    sd["lm_head.weight"] = lm.contiguous()
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    post = plant_drift(base, tmp_path / "post", rows={}, tensor_suffix="lm_head.weight")
    sd = load_file(post / "model.safetensors")
    sd["lm_head.weight"][word] = c + 0.05 * float(lm.std()) * torch.randn(lm.shape[1], generator=g)
    save_file(sd, post / "model.safetensors", metadata={"format": "pt"})

    run = vocabdrift.diff(base, post, out=tmp_path / "run", neighbors_top=3, neighbors_of=[str(word)], k=10)
    s = json.loads((run / "summary.json").read_text())["neighbors"]
    first = s["per_token"][0]
    assert first["token_id"] == word and first["category"] == "latin"
    assert first["intrusion_post"] == 1.0 and first["intrusion_base"] < 0.6
    assert first["own_post"] == 0.0 and first["own_change"] == -first["own_base"]
    assert s["intrusion"]["change"] > 0 and s["k"] == 10 and s["tokens"] >= 1
    from vocabdrift.outputs.console import intrusion_line

    line = intrusion_line(s)
    assert "k=10" in line and f"-> {100 * s['intrusion']['post']:.0f}%" in line
    # an independent count from neighbors.parquet
    nt = pq.read_table(run / "neighbors.parquet").to_pylist()
    post_ids = [r["neighbor_id"] for r in nt if r["token_id"] == word and r["model"] == "post"]
    assert sorted(post_ids) == sorted(cluster)

    # the report shows it, from the run folder alone
    from vocabdrift.outputs.report import build_sections, read_run

    sections = build_sections(read_run(run))
    intr = [i for sec in sections for i in sec.items if getattr(i, "key", "") == "intrusion"]
    assert len(intr) == 1 and intr[0].rows[0][0] == str(word) and intr[0].rows[0][4] == "100%"

    table = vocabdrift.neighbors(post, str(word), base=base, k=10)
    assert set(table.column("category").to_pylist()) >= {"special", "byte"}
    from rich.console import Console

    con = Console(record=True, width=200)
    con.print(neighbors_console_table(table, title="t"))
    text = con.export_text()
    assert "★" in text and "(byte)" in text and "post 100%" in text


# ---- verification at speed ------------------------------------------------------------------------------------

class _FakeEngine:
    """p of (template, token) from a table; counts the rows scored."""

    def __init__(self, p: np.ndarray) -> None:
        self.p, self.rows = p, 0

    def score(self, prompts, targets, top_p=0.95):  # noqa: ANN001, ANN201
        from vocabdrift.analyses.probe import Score

        self.rows += len(targets)
        return [Score(float(np.log(self.p[pr[0], t])), 2, False, top_p) for pr, t in zip(prompts, targets,
                                                                                          strict=True)]


class _Enc:
    def __init__(self, j: int) -> None:
        self.template = f"t{j}"
        self.j = j

    def with_token(self, t: int) -> list[int]:
        return [self.j, t]


def test_verify_candidates_gives_the_verdicts_of_every_template_with_fewer_rows() -> None:
    from vocabdrift.analyses.probe import VERIFY_P
    from vocabdrift.api.probe import verify_candidates

    rng = np.random.default_rng(0)
    n, k = 300, 4
    p = rng.uniform(0, 0.005, (k, n))  # under-trained unless a template says otherwise
    decisive = rng.random(n) < 0.8
    p[2, decisive] = rng.uniform(0.01, 0.5, decisive.sum())  # template 2 settles most tokens
    p[0, :20] = 0.02  # template 0 settles a few
    p[:, 50] = 0.0099  # just below the line everywhere: verified
    eng = _FakeEngine(p)
    ids = list(range(n))
    best = verify_candidates(eng, [_Enc(j) for j in range(k)], ids, batch_size=32)
    want = p.max(0) < VERIFY_P
    assert [best[t] < VERIFY_P for t in ids] == want.tolist()
    assert eng.rows < 0.5 * k * n  # the undecided tokens alone see every template


@pytest.mark.slow
def test_verify_candidates_on_smollm2_matches_every_template(smollm2_gguf: Path) -> None:
    from vocabdrift.analyses import probe as P
    from vocabdrift.api.probe import verify_candidates
    from vocabdrift.engines.hf import HFEngine

    eng = HFEngine(smollm2_gguf, batch_size=16)
    encs = [P.encode_template(t, eng.tokenizer) for t in P.resolve_templates(None, eng.tokenizer)]
    ids = [17, 200, 1000, 5000, 12000, 30000, 40000, 49151, *range(48000, 48024)]
    every = {t: max(eng.score([e.with_token(t)], [t])[0].p for e in encs) for t in ids[:8]}
    for e in encs:  # the rest batched per template, as before
        for t, sc in zip(ids[8:], eng.score([e.with_token(t) for t in ids[8:]], ids[8:]), strict=True):
            every[t] = max(every.get(t, 0.0), sc.p)
    fast = verify_candidates(eng, encs, ids, batch_size=16)
    assert {t: fast[t] < P.VERIFY_P for t in ids} == {t: every[t] < P.VERIFY_P for t in ids}


# ---- collapsed rows in diff, undertrained and the report -------------------------------------------------------

def _planted_collapse(tmp_path: Path) -> tuple[Path, Path, np.ndarray, int]:
    """BASE: the padding rows are one vector (already collapsed). POST: five Cyrillic tokens join them (collapsed
    during post-training). -> base, post, the five ids, the tokenizer's size."""
    import torch
    from safetensors.torch import load_file, save_file

    from vocabdrift.sources.vocabulary import vocab_table

    tj = json.loads(train_bpe(tmp_path / "tok").read_text())
    n_tok = len(tj["model"]["vocab"])
    base = make_llama(tmp_path / "base", vocab=n_tok + N_PAD, tokenizer_from=tmp_path / "tok", dtype="float32")
    sd = load_file(base / "model.safetensors")
    lm = sd["lm_head.weight"].clone()
    c = torch.randn(lm.shape[1], generator=torch.Generator().manual_seed(0)) * float(lm.std())
    lm[n_tok:] = c
    sd["lm_head.weight"] = lm.contiguous()
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    post = plant_drift(base, tmp_path / "post", rows={}, tensor_suffix="lm_head.weight")
    cats = np.asarray(vocab_table(base).column("category").to_pylist())
    joined = np.flatnonzero(cats == "cyrillic")[:5]
    sd = load_file(post / "model.safetensors")
    for i in joined:
        sd["lm_head.weight"][int(i)] = c * 0.7
    save_file(sd, post / "model.safetensors", metadata={"format": "pt"})
    return base, post, joined, n_tok


def test_collapsed_rows_in_diff_undertrained_and_report(tmp_path: Path) -> None:
    """A plain `diff` (collapse is on by default) says which tokens collapsed during post-training and which
    already were; `undertrained` and the report show them too."""
    from vocabdrift.outputs.report import build_sections, read_run

    base, post, joined, n_tok = _planted_collapse(tmp_path)
    run = vocabdrift.diff(base, post, out=tmp_path / "run", neighbors_top=0)
    s = json.loads((run / "summary.json").read_text())["collapse"]["lm_head"]
    assert s["new"] == 5 and s["already"] == N_PAD and s["released"] == 0
    assert sorted(s["new_ids"]) == joined.tolist() and s["already_ids"] == list(range(n_tok, n_tok + N_PAD))
    assert [int(t.rsplit("(", 1)[1].rstrip(")")) for t in s["new_tokens"]] == joined.tolist()
    assert len(s["already_tokens"]) == min(12, N_PAD)
    assert s["categories"]["cyrillic"]["new"] == 5 and s["categories"]["padding"]["already"] == N_PAD
    assert s["post"]["groups"] == 1 and s["post"]["largest"][0] == {"group": int(joined[0]), "size": N_PAD + 5}
    d = pq.read_table(run / "drift.parquet")
    size_post = d.column("lm_head_group_size_post").to_numpy()
    assert size_post[joined].tolist() == [N_PAD + 5] * 5 and (d.column("lm_head_group_size_base").to_numpy()[
        n_tok:] == N_PAD).all()
    assert int((size_post > 0).sum()) == N_PAD + 5
    items = [i for sec in build_sections(read_run(run)) for i in sec.items if getattr(i, "key", "") == "collapse"]
    assert len(items) == 1 and "Russian" in items[0].rows[0][0] and items[0].rows[0][1] == "5"
    assert any(getattr(i, "text", "").count(s["new_tokens"][0]) for sec in build_sections(read_run(run))
               for i in sec.items)  # the report names the tokens

    from vocabdrift.outputs.console import collapse_line

    full = json.loads((run / "summary.json").read_text())["collapse"]
    assert f"5 collapsed during post-training, {N_PAD} already were" in collapse_line(full)

    r = vocabdrift.undertrained(post, verify=False)
    assert f"lm_head: {N_PAD + 5} rows in 1 groups" in collapse_line(r.summary["collapse"])
    u = r.summary["collapse"]["lm_head"]
    assert u["rows"] == N_PAD + 5 and u["categories"]["cyrillic"]["collapsed"] == 5
    sizes = r.table.column("lm_head_collapse_size").to_numpy()
    assert sizes[joined].tolist() == [N_PAD + 5] * 5 and int((sizes > 0).sum()) == N_PAD + 5
    assert "embed_collapse_size" in r.table.column_names


def test_cli_diff_reports_collapsed_rows_by_default(tmp_path: Path) -> None:
    """`vocabdrift diff BASE POST -o RUN`, no option: the console names the tokens that collapsed during
    post-training and those already collapsed in BASE; `--no-collapse` leaves it out."""
    import subprocess
    import sys

    base, post, joined, _ = _planted_collapse(tmp_path)
    exe = [sys.executable, "-c", "from vocabdrift.cli import main; main()"]
    r = subprocess.run([*exe, "diff", str(base), str(post), "-o", str(tmp_path / "run")], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())["collapse"]["lm_head"]
    assert s["new"] == 5 and sorted(s["new_ids"]) == joined.tolist()
    assert f"5 collapsed during post-training, {N_PAD} already were" in r.stdout
    assert "collapsed during post-training: " + s["new_tokens"][0] in r.stdout
    assert "already collapsed in BASE: " + s["already_tokens"][0] in r.stdout
    r = subprocess.run([*exe, "diff", str(base), str(post), "-o", str(tmp_path / "off"), "--no-collapse"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "collapse" not in json.loads((tmp_path / "off" / "summary.json").read_text())
    assert "collapsed during post-training" not in r.stdout


def test_cli_undertrained_prints_the_share_as_given(tmp_path: Path) -> None:
    """`--share 0.001` printed "0% most suspicious": the share is printed as given."""
    import subprocess
    import sys

    tj = json.loads(train_bpe(tmp_path / "tok").read_text())
    model = make_llama(tmp_path / "m", vocab=len(tj["model"]["vocab"]) + N_PAD, tokenizer_from=tmp_path / "tok")
    exe = [sys.executable, "-c", "from vocabdrift.cli import main; main()"]
    for share, want in (("0.001", "(0.1% most suspicious)"), ("0.02", "(2% most suspicious)"),
                        ("0.0125", "(1.25% most suspicious)")):
        r = subprocess.run([*exe, "undertrained", str(model), "-o", str(tmp_path / f"run{share}"), "--share", share,
                            "--no-verify", "--unused", "5"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert want in r.stdout and f"reference rows: {N_PAD + 1}" in r.stdout
