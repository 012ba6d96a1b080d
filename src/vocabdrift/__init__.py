"""vocabdrift: measure, explain, predict, prove, repair and guard against lm_head vocabulary drift.

The public API is a few verbs, loaded lazily so that `import vocabdrift` (and `vocabdrift --help`) stays instant:

    >>> import vocabdrift
    >>> vocabdrift.diff("base/", "post/", out="runs/a")          # drift between two checkpoints
    >>> vocabdrift.vocab("base/", out="runs/a")                  # the vocabulary table
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import VocabdriftError

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "open_checkpoint": "vocabdrift.sources.checkpoint",
    "load_tokenizer": "vocabdrift.sources.tokenizer",
    "open_run": "vocabdrift.outputs.run",
    "diff": "vocabdrift.api.diff",
    "vocab": "vocabdrift.api.diff",
    "neighbors": "vocabdrift.api.diff",
    "coverage": "vocabdrift.api.coverage",
    "synth": "vocabdrift.api.coverage",
    "mix": "vocabdrift.api.coverage",
    "prune_suggest": "vocabdrift.api.coverage",
    "check": "vocabdrift.api.check",
    "probe": "vocabdrift.api.probe",
    "cases": "vocabdrift.api.probe",
    "undertrained": "vocabdrift.api.probe",
    "confusion": "vocabdrift.api.probe",
    "saymap": "vocabdrift.api.saymap",
    "repair": "vocabdrift.composites.repair",
    "evaluate": "vocabdrift.composites.evaluate",
    "recommendation": "vocabdrift.api.recommend",
    "VocabDriftCallback": "vocabdrift.composites.callback",
    "lab": "vocabdrift.composites.lab",
    "report": "vocabdrift.outputs.report",
}

__all__ = ["VocabdriftError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vocabdrift' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy verbs too: `dir(vocabdrift)` and tab completion show what the package offers."""
    return sorted({*__all__, *(k for k in globals() if k.startswith("__"))})
