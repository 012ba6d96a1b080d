"""The run folder: the contract between commands (see DESIGN.md).

Every write is atomic: a file goes to a temporary name in the same folder and is renamed into place, and a new
run folder is built under a hidden temporary name and renamed only when the command succeeds. So a killed or
failed command never leaves something that looks complete.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import VocabdriftError

if TYPE_CHECKING:
    import pyarrow as pa

_PACKAGES = ("vocabdrift", "numpy", "torch", "safetensors", "tokenizers", "transformers", "gguf", "pyarrow")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a file under a temporary name in its folder, then rename it into place (readers never see half)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """A cheap, stable identity for an input: size plus sha256 of its first and last MiB (per file).

    Hashing a 30 GB checkpoint whole would cost more than the analysis; head and tail catch every
    realistic change (safetensors headers hold every tensor's offsets) at a fixed cost.
    """
    p = Path(path)
    if not p.exists():
        return {"path": str(path)}
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    size = 0
    for f in files:
        n = f.stat().st_size
        size += n
        h.update(f.name.encode() + n.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if n > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return {"path": str(p.resolve()), "bytes": size, "files": len(files), "quick_sha256": h.hexdigest()}


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


class Run:
    """A run folder, opened for reading and writing. Tables are Parquet, everything else JSON."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # ---- tables -------------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    def write_table(self, name: str, table: pa.Table) -> Path:
        """Write `name` (e.g. "drift.parquet") atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        out = self.path / name
        write_bytes_atomic(out, sink.getvalue().to_pybytes())
        return out

    def read_table(self, name: str) -> pa.Table:
        import pyarrow.parquet as pq

        p = self.path / name
        if not p.exists():
            raise VocabdriftError(f"{p}: not found; run the command that writes {name} into {self.path} first")
        return pq.read_table(p)

    # ---- json ---------------------------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> Path:
        out = self.path / name
        write_bytes_atomic(out, (json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n").encode())
        return out

    def read_json(self, name: str, default: Any = None) -> Any:
        p = self.path / name
        if not p.exists():
            if default is not None:
                return default
            raise VocabdriftError(f"{p}: not found; run the command that writes {name} into {self.path} first")
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise VocabdriftError(f"{p}: not valid JSON ({e}); delete it and rerun the command") from e

    def update_summary(self, **keys: Any) -> Path:
        """Merge top-level keys into summary.json: later commands add their keys beside diff's."""
        summary = self.read_json("summary.json", default={})
        summary.update(keys)
        return self.write_json("summary.json", summary)

    def record(self, command: str, *, arguments: dict[str, Any], inputs: dict[str, Any] | None = None,
               seed: int | None = None, timings: dict[str, float] | None = None) -> Path:
        """Append what made this run's files to manifest.json (command, arguments, versions, input fingerprints)."""
        manifest = self.read_json("manifest.json", default={"commands": []})
        manifest.setdefault("commands", []).append({
            "command": command,
            "arguments": arguments,
            "inputs": {k: fingerprint(v) if isinstance(v, (str, os.PathLike)) else v
                       for k, v in (inputs or {}).items()},
            "seed": seed,
            "timings": timings or {},
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "packages": package_versions(),
        })
        return self.write_json("manifest.json", manifest)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def open_run(path: str | os.PathLike, *, create: bool = True) -> Iterator[Run]:
    """Open RUN for a command. A new folder is built under a hidden name and renamed into place on success,
    so a failed command leaves nothing; an existing folder gets new files, each written atomically.

    Example:
        >>> with open_run("runs/a") as run:
        ...     run.write_json("summary.json", {})
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise VocabdriftError(f"{final}: exists and is not a folder; pick another -o")
    if final.exists():
        yield Run(final)
        return
    if not create:
        raise VocabdriftError(f"{final}: no such run folder; create it with `vocabdrift diff` or another command")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
    try:
        yield Run(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Timer:
    """Collects stage timings for the manifest: `with t("read"): ...`."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - t0, 4)
