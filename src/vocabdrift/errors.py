"""The one exception type users see. Messages name the file, tensor or token, and say what to do."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType

# The optional packages and the extra of pyproject.toml that brings each: a plain `pip install vocabdrift` has
# none of them, and a command that needs one says which extra to install (`need_extra`; the CLI's `main` catches
# the imports that do not go through it).
EXTRA_OF = {"trl": "train", "datasets": "train", "accelerate": "train", "plotly": "report", "matplotlib": "report",
            "httpx": "openai", "faker": "lab", "wordfreq": "lab", "ray": "ray", "vllm": "vllm"}


class VocabdriftError(Exception):
    """A problem with the user's input: bad file, mismatched models, unknown token.

    The CLI prints it as one line and exits 2; anything else is a bug: one line and exit code 70, with the
    traceback when VOCABDRIFT_DEBUG=1 (never exit 1, which `check` uses for "drift found").
    """


def need_extra(module: str, extra: str, what: str, *, load: bool = True) -> ModuleType | None:
    """`module`, imported; or a VocabdriftError naming the extra that installs it (the CLI: one line, exit 2).

    Args:
        module: what to import, e.g. "datasets" or "plotly.offline".
        extra: the optional-dependency group of pyproject.toml that brings it: train, report, lab, openai.
        what: what needs it, the start of the message: "`vocabdrift repair`", "the HTML report".
        load: False only checks that the package is there, without the seconds some imports take (the lab checks
            everything up front, then imports it while it builds its corpus); returns None then.

    Example:
        >>> trl = need_extra("trl", "train", "`vocabdrift repair`")
    """
    import importlib
    import importlib.util
    import sys

    top = module.partition(".")[0]
    try:
        if load:
            return importlib.import_module(module)
        present = sys.modules[top] is not None if top in sys.modules else importlib.util.find_spec(top) is not None
        if not present:
            raise ModuleNotFoundError(f"No module named {top!r}", name=top)
        return None
    except ImportError as e:  # not installed, or installed but broken (a version that lacks a name we import)
        why = f"{e.name} is not installed" if isinstance(e, ModuleNotFoundError) and e.name else f"{top}: {e}"
        raise VocabdriftError(missing_extra(what, extra, why)) from e


def missing_extra(what: str, extra: str, why: str) -> str:
    """The one line for a missing optional package: what needs it, why it failed, and the extra to install."""
    return f"{what} needs the `{extra}` extra ({why}): pip install 'vocabdrift[{extra}]'"
