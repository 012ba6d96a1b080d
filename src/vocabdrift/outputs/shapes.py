"""The shapes of a run folder's JSON files, checked where they are read back (the report, `check --run`).

Why: the report formats numbers straight from summary.json, cases.json and confusion.json; a file edited by hand,
cut short by a full disk or written by an incompatible version held a string where a number belongs, and the
report died with a TypeError. Checked here, it is one line naming the file, the key and what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import VocabdriftError

Check = Callable[[Any, str], None]


class _Bad(Exception):
    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")


def _num(v: Any, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad(where, f"{_show(v)} is not a number")


def _opt_num(v: Any, where: str) -> None:
    if v is not None:
        _num(v, where)


def _int(v: Any, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _Bad(where, f"{_show(v)} is not a count")


def _str(v: Any, where: str) -> None:
    if not isinstance(v, str):
        raise _Bad(where, f"{_show(v)} is not text")


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:39] + "…"


def _obj(fields: dict[str, Check], *, rest: Check | None = None) -> Check:
    """An object whose listed keys, when present, pass their checks (and every other key `rest`, if given)."""

    def check(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(where, f"{_show(v)} is not an object")
        for k, sub in v.items():
            f = fields.get(k, rest)
            if f is not None:
                f(sub, f"{where}.{k}")

    return check


def _list(item: Check) -> Check:
    def check(v: Any, where: str) -> None:
        if not isinstance(v, list):
            raise _Bad(where, f"{_show(v)} is not a list")
        for i, x in enumerate(v):
            item(x, f"{where}[{i}]")

    return check


def _opt(c: Check) -> Check:
    def check(v: Any, where: str) -> None:
        if v is not None:
            c(v, where)

    return check


_STATS = _obj({"tokens": _int, "mean_cos": _opt_num, "min_cos": _opt_num, "below_0.95": _int, "below_0.90": _int,
               "below_threshold": _int, "undefined": _int})
_BLOCK = _obj({"lm_head": _STATS, "embed": _STATS})
_COVERAGE = _obj({"floor": _int, "samples": _int, "target_tokens": _int, "tokens": _int, "malformed": _int,
                  "targets": _str,
                  "categories": _obj({}, rest=_obj({"tokens": _int, "at_or_above_floor": _int, "zero_share": _num})),
                  "correlation": _opt(_obj({"overall": _opt(_obj({"n": _int, "spearman_rho": _opt_num,
                                                                   "p_value": _opt_num}))}))})
SUMMARY = _obj({"threshold": _num, "overall": _BLOCK, "reachable": _BLOCK, "categories": _obj({}, rest=_BLOCK),
                "coverage": _COVERAGE, "probe": _obj({"models": _list(_str)}),
                "cases": _obj({}, rest=_obj({"passed": _int, "total": _int}))})
_ONE_MODEL_CASES = _obj({"passed": _int, "total": _int, "model": _str,
                         "cases": _list(_obj({"forbidden": _opt(_list(lambda v, w: None)), "passed": _opt(lambda v, w:
                                                                                                       None)}))})
_CONF_RESULT = _obj({"n": _int, "hits": _int, "rate": _num, "ci_low": _num, "ci_high": _num,
                     "by_script": _opt(_obj({}, rest=_num)), "native": _int, "native_rate": _num})
CONFUSION = _obj({"results": _list(_CONF_RESULT),
                  "tests": _opt(_list(_obj({"models": _list(lambda v, w: None), "odds_ratio": _opt_num,
                                            "p_value": _opt_num})))})


def _cases(v: Any, where: str) -> None:
    """cases.json: one model's cases (an object) or a list of them."""
    for i, one in enumerate(v if isinstance(v, list) else [v]):
        _ONE_MODEL_CASES(one, f"{where}[{i}]" if isinstance(v, list) else where)


CASES: Check = _cases


def check_shape(obj: Any, shape: Check, path: Path | str, *, fix: str) -> Any:
    """`obj` (read from `path`) if it has `shape`; else one clear error naming the file, the key and `fix`."""
    try:
        shape(obj, "")
    except _Bad as e:
        where = str(e).lstrip(".")
        raise VocabdriftError(f"{path}: unexpected content at {where or 'the top'}; {fix}") from None
    return obj
