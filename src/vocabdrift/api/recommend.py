"""The run folder's one recommendation (`analyses.recommend`), read from every table the folder holds: diff's drift
and collapsed rows, coverage's counts, the probe's LOST and control tokens, the say-ability map's LOST tokens.
`coverage`, `check`, `synth --run`, `mix` and `repair` take it from here; the report computes it from the same
tables (`analyses.recommend.from_tables`).
"""

from __future__ import annotations

import os

from ..analyses import recommend as A
from ..errors import VocabdriftError
from ..outputs import run as R

PathLike = str | os.PathLike


def recommendation(run: PathLike, *, threshold: float | None = None, max_tokens: int = A.MAX_TOKENS,
                   batch_size: int = 4) -> A.Recommendation:
    """The recommendation for RUN (a `diff` run folder; coverage and probe results are used when present).

    Example:
        >>> rec = recommendation("runs/sft1")
        >>> print("\\n".join(rec.lines))
    """
    r = R.Run(run)
    if not r.has(R.DRIFT) or not r.has(R.VOCAB):
        raise VocabdriftError(f"{run}: holds no diff (drift.parquet and vocab.parquet); run `vocabdrift diff BASE "
                              f"POST -o {run}` first")
    return A.from_tables(r.read_table(R.VOCAB), r.read_table(R.DRIFT, ("token_id", "lm_head_cos")),
                         r.read_json(R.SUMMARY, default={}),
                         coverage=r.read_table(R.COVERAGE, ("token_id", "count")) if r.has(R.COVERAGE) else None,
                         probe=r.read_table(R.PROBE) if r.has(R.PROBE) else None,
                         saymap=r.read_table(R.SAYMAP, ("token_id", "category", "status", "post_p"))
                         if r.has(R.SAYMAP) else None, threshold=threshold,
                         max_tokens=max_tokens, batch_size=batch_size)
