"""A plain `pip install vocabdrift` has none of the optional packages: every command that needs one says, in one
line on stderr, which extra installs it, and exits 2 (bad input), never 70 (a bug) with a traceback.

A missing package is simulated in-process: `None` in `sys.modules` under its name (and its loaded submodules')
makes `import NAME` raise ModuleNotFoundError, as an absent package does. The CLI runs in this process, through
`vocabdrift.cli.main`, the entry point `pip install` writes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from vocabdrift.errors import EXTRA_OF, VocabdriftError

Cli = Callable[..., tuple[int, str, str]]


def hide(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """`import package` (and of any submodule already loaded) raises ModuleNotFoundError until the test ends."""
    for name in [package, *(m for m in sys.modules if m.startswith(package + "."))]:
        monkeypatch.setitem(sys.modules, name, None)


def assert_names_extra(code: int, err: str, extra: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "bug" not in err, err
    # one line, whatever the library's message; in this process, a progress bar of a library imported before `main`
    # (a separate process silences them, tests/test_trust.py) may come before it
    ours = [ln for ln in err.splitlines() if ln.startswith("vocabdrift")]
    assert len(ours) == 1 and err.rstrip("\n").endswith(ours[0]), err
    assert ours[0].startswith("vocabdrift: error: ") and f"needs the `{extra}` extra" in ours[0], err
    assert f"pip install 'vocabdrift[{extra}]'" in ours[0], err


@pytest.mark.slow
@pytest.mark.parametrize("package", ["datasets", "trl"])
def test_repair_without_the_training_packages_names_the_train_extra(package: str, tmp_path: Path, cli: Cli,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from factory import make_llama

    from vocabdrift.composites.train import CHAT_TEMPLATE

    base = make_llama(tmp_path / "base", dtype="float32")
    cfg = json.loads((base / "tokenizer_config.json").read_text())  # what repair needs to get as far as training
    cfg.update(chat_template=CHAT_TEMPLATE, pad_token="<|endoftext|>")
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}"},
                                                     {"role": "assistant", "content": "The fox."}]}) + "\n"
                            for i in range(8)))
    hide(monkeypatch, package)
    code, _, err = cli("repair", base, data, "-o", tmp_path / "out", "--coverage", "none", "--steps", "1",
                       "--batch-size", "4", "--max-length", "64")
    assert_names_extra(code, err, "train")
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.parametrize("package", ["plotly", "matplotlib"])
def test_report_without_its_packages_names_the_report_extra_and_writes_nothing(package: str, tmp_path: Path,
                                                                               cli: Cli,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from test_report import make_run

    run = make_run(tmp_path / "run", ())
    before = sorted(p.name for p in run.iterdir())
    hide(monkeypatch, package)
    code, _, err = cli("report", "--run", run)
    assert_names_extra(code, err, "report")
    assert sorted(p.name for p in run.iterdir()) == before  # no half report: no report.html, no report_files/


@pytest.mark.parametrize("package", ["faker", "wordfreq", "trl", "matplotlib"])
def test_lab_checks_its_packages_before_it_starts(package: str, tmp_path: Path, cli: Cli,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    hide(monkeypatch, package)
    code, _, err = cli("lab", "-o", tmp_path / "lab", "--quick")
    assert_names_extra(code, err, "lab")
    assert package in err and not (tmp_path / "lab").exists()


def test_the_openai_engine_without_httpx_names_the_openai_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from vocabdrift.engines.openai import OpenAIEngine

    hide(monkeypatch, "httpx")
    with pytest.raises(VocabdriftError, match=r"needs the `openai` extra \(httpx is not installed\): "
                                              r"pip install 'vocabdrift\[openai\]'"):
        OpenAIEngine("http://127.0.0.1:9", model="m")


def test_a_missing_package_imported_elsewhere_is_still_one_line_and_exit_2(cli: Cli, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The net under `need_extra`: an optional package imported directly still gives the one line and 2; a module
    that is no optional package of ours stays a bug (70)."""
    import vocabdrift.outputs.report as rep

    def missing(name: str) -> Callable[..., None]:
        def report(*args: object, **kw: object) -> None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return report

    from test_report import make_run

    run = make_run(tmp_path / "run", ())
    monkeypatch.setattr(rep, "report", missing("wordfreq"))
    code, _, err = cli("report", "--run", run)
    assert_names_extra(code, err, "lab")
    assert "`vocabdrift report`" in err
    monkeypatch.setattr(rep, "report", missing("no_such_module_of_ours"))
    code, _, err = cli("report", "--run", run)
    assert code == 70 and "bug" in err, err


def test_each_optional_package_is_in_the_extra_that_is_named_for_it() -> None:
    """The extras in pyproject.toml: each package `need_extra` names is in its extra, and the lab's extra holds all
    that the lab runs (its corpus, training, the report)."""
    tomllib = pytest.importorskip("tomllib")
    from vocabdrift.composites.lab import LAB_PACKAGES
    from vocabdrift.composites.train import TRAINING

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(extra: str) -> set[str]:
        return {s.split(">")[0].split("[")[0].split("=")[0].strip().lower() for s in extras[extra]}

    for package, extra in EXTRA_OF.items():
        assert package in names(extra), (package, extra)
    assert set(TRAINING) <= names("train")
    assert set(LAB_PACKAGES) <= names("lab") and names("train") | names("report") <= names("lab")


@pytest.mark.slow
def test_the_measuring_commands_need_no_extra(tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every optional package missing, `diff`, `check`, `vocab` and `neighbors` run as they do with them."""
    from factory import make_llama, plant_drift

    base = make_llama(tmp_path / "base", dtype="float32")
    post = plant_drift(base, tmp_path / "post", rows={5: 0.5, 9: 0.8}, tensor_suffix="lm_head.weight")
    for package in EXTRA_OF:
        hide(monkeypatch, package)
    run = tmp_path / "run"
    for args in (("diff", base, post, "-o", run), ("check", "--run", run), ("vocab", base, "-o", tmp_path / "vocab"),
                 ("neighbors", post, "5", "--base", base)):
        code, out, err = cli(*args)
        assert code in (0, 1) and "extra" not in err and "bug" not in err, (args, code, err)
        assert out, args
