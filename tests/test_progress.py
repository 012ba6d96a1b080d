"""Progress off a terminal: a line at a steady pace in a log file (`progress.bar(..., "lines")`), nothing for quick
work, a rich bar on a terminal, nothing at all for the Python API's default."""

from __future__ import annotations

import pytest

from vocabdrift.progress import bar, cli_mode


def test_lines_mode_prints_done_total_and_time_left(capsys: pytest.CaptureFixture[str]) -> None:
    with bar("lines", 4, "probing", every=0.0) as advance:
        for _ in range(4):
            advance(1)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("probing: 1/4 (") and "left)" in err[0]
    assert err[-1].startswith("probing: 4/4 done (") and "left" not in err[-1]
    assert len(err) == 5  # one line per advance (every=0) and the last one


def test_quick_work_and_the_silent_mode_print_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with bar("lines", 3, "probing", every=3600.0) as advance:
        advance(3)
    with bar(False, 3, "probing") as advance:
        advance(3)
    assert capsys.readouterr().err == ""


def test_the_command_line_picks_lines_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_mode() == "lines"  # pytest's stderr is not a terminal
    assert cli_mode(quiet=True) is False
