"""Atomic files: the one writer every file of vocabdrift goes through (run folders, the vocabulary cache, synth
and mix outputs, the lab's tables).

A file is written under a temporary name in its folder and renamed into place, so a reader never sees half of it
and a killed command leaves nothing that looks complete. The file gets the permissions `open()` would give it
(0666 less the umask): `mkstemp` alone makes 0600. It sits at the bottom of the package (beside `errors`) so that
sources (the cache) and outputs (the run folder) share it; `outputs.run` re-exports it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` gives a new file: 0666 less the umask."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    """The mode `mkdir()` gives a new folder: 0777 less the umask."""
    return 0o777 & ~umask()


@contextlib.contextmanager
def _atomic(path: Path, mode: str) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a file under a temporary name in its folder, then rename it into place (readers never see half)."""
    with _atomic(Path(path), "wb") as f:
        f.write(data)


def write_lines_atomic(path: str | os.PathLike, lines: Iterable[str]) -> int:
    """Stream lines (a newline after each) into a file atomically; returns how many were written."""
    n = 0
    with _atomic(Path(path), "w") as f:
        out: IO[str] = f
        for line in lines:
            out.write(line)
            out.write("\n")
            n += 1
    return n


def write_parquet_atomic(path: str | os.PathLike, table: pa.Table, *, compression: str | None = "zstd") -> None:
    """A Parquet file, atomically (zstd unless told otherwise)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **({"compression": compression} if compression else {}))
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


@contextlib.contextmanager
def new_folder(final: str | os.PathLike) -> Any:
    """Yield a temporary folder beside `final`, renamed to `final` when the block ends well and removed when it
    does not: a run folder or a model folder appears whole or not at all. The folder and the files in it get the
    modes `mkdir()` and `open()` would give them (mkdtemp makes 0700, some writers 0600)."""
    import errno
    import shutil

    from .errors import VocabdriftError

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_partials(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-{os.getpid()}-"))
    try:
        yield tmp
        os.chmod(tmp, folder_mode())
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, file_mode())
        try:
            os.rename(tmp, final)  # an existing empty folder is replaced; a non-empty one refuses
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            raise VocabdriftError(f"{final}: another command created it meanwhile (two commands writing one new "
                                  "folder at once: the first won); rerun to add to it, or pick another folder"
                                  ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sweep_partials(final: Path) -> None:
    """Remove the `.NAME.partial-PID-*` folders of commands that were killed (their process is gone): nothing
    else cleans up after a SIGKILL. A live process's partial folder is left alone."""
    import shutil

    for p in final.parent.glob(f".{final.name}.partial-*"):
        pid = p.name[len(f".{final.name}.partial-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:  # alive, another user's
            continue
