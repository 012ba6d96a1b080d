"""The vocabulary table built in a process of its own, for `measure` (see `diff._vocab_in_child`).

    python -m vocabdrift.api._vocab_child OUT.arrow '[["tokenizer spec", rows], ...]'

Writes the table of the first candidate that gives one; on bad input, one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import pyarrow as pa

    from ..errors import VocabdriftError
    from .diff import first_vocab_table

    out, candidates = argv[0], [(str(spec), int(size)) for spec, size in json.loads(argv[1])]
    try:
        table = first_vocab_table(candidates)
    except VocabdriftError as e:
        print(str(e), file=sys.stderr)
        return 2
    with pa.OSFile(out, "wb") as f, pa.ipc.new_file(f, table.schema) as w:  # Arrow IPC: no encoding either way
        w.write_table(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
