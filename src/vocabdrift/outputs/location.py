"""Where a command may write: checked before any computation, so a bad `-o` costs one line, not a lost hour.

Two promises of the README live here: model folders are never written to, and an input is never overwritten. A
run folder (or an output file) may not lie inside a model folder, be an input file, or lie inside a data folder
that is read (the next run would read the output as data); and its nearest existing folder must take a new entry
(not a file, not /proc, not read-only, not full of someone else's permissions). The check creates and removes one
empty probe folder there, which is the only sure test (root ignores permission bits; /proc and read-only mounts
refuse whatever the bits say).
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import VocabdriftError
from .run import is_run_folder, ours

PathLike = str | os.PathLike


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _local(spec: PathLike | None) -> Path | None:
    """The resolved local path of an input, or None for a hub id, a URL or nothing."""
    if spec is None:
        return None
    text = os.fspath(spec)
    if "://" in text or not text.strip():  # a URL, or an empty name (refused by the reader, with its own words)
        return None
    p = Path(text).expanduser()
    return p.resolve() if p.exists() else None


def _model_folder(p: Path) -> Path | None:
    """The model folder an input stands for: a folder named as the model, or the folder of a file in a Hugging
    Face layout (beside a config.json). A lone .gguf or .safetensors file among other files has none: the folder
    it sits in (often the working folder) is not a model folder."""
    if p.is_dir():
        return p
    return p.parent if (p.parent / "config.json").is_file() else None


_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")


def is_model_folder(d: Path) -> bool:
    """A Hugging Face model folder: a config.json beside weights or a tokenizer. vocabdrift writes into none,
    whether or not the command was given it as an input."""
    try:
        if not (d / "config.json").is_file():
            return False
        return (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file() or any(
            f.suffix in _WEIGHT_SUFFIXES for f in d.iterdir())
    except OSError:
        return False


def check_out(out: PathLike, *, models: Iterable[PathLike | None] = (), data: Iterable[PathLike | None] = (),
              file: bool = False, flag: str = "-o", lab: bool = False) -> Path:
    """Refuse an output location before anything is computed; return it as a Path. The one gate every path
    vocabdrift writes goes through (the CLI runs it on every output option as it parses, the Python API again).

    Args:
        out: the run folder (or, with `file`, the file) to write.
        models: model inputs (folders, weights files, tokenizer files, hub ids): nothing may be written inside
            their model folder (see `_model_folder`), nor onto an input file. Any model folder (`is_model_folder`)
            is refused too, named as an input or not.
        data: data inputs (files or folders): the output may not be one of them or lie inside a data folder.
        file: `out` is a file (synth, mix, a CSV), not a run folder: never a file of a run folder's contract.
        lab: `out` is the lab's folder (it carries lab.json), not a run folder.
    """
    raw = Path(out).expanduser()
    if not os.fspath(out).strip():
        raise VocabdriftError(f"{flag} is empty; name the {'file' if file else 'run folder'} to write")
    if any(len(part.encode("utf-8", "surrogateescape")) > 255 for part in raw.parts):  # before any system call
        raise VocabdriftError(f"{flag} {raw}: a name in it is longer than 255 bytes, more than a file system "
                              "takes; pick a shorter name")
    try:
        if raw.is_symlink() and not raw.exists():
            raise VocabdriftError(f"{flag} {raw}: a symbolic link to {os.readlink(raw)}, which does not exist; name a "
                                  "real location")
        target = raw.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, a path the system refuses
        raise VocabdriftError(f"{flag} {raw}: cannot be resolved ({e}); pick another location") from e
    if any(len(part.encode("utf-8", "surrogateescape")) > 255 for part in target.parts):
        raise VocabdriftError(f"{flag} {raw}: a name in it is longer than 255 bytes, more than a file system "
                              "takes; pick a shorter name")
    kind = "file" if file else "lab folder" if lab else "run folder"
    for folder in (target, *target.parents):
        if folder.is_dir() and is_model_folder(folder):
            raise VocabdriftError(f"{flag} {raw}: lies inside the model folder {folder}; vocabdrift never writes "
                                  f"into a model folder — pick a {kind} outside it")
    for spec in models:
        p = _local(spec)
        if p is None:
            continue
        if target == p and not p.is_dir():
            raise VocabdriftError(f"{flag} {raw}: is an input model file; vocabdrift never overwrites an input — "
                                  f"pick another {kind}")
        folder = _model_folder(p)
        if folder is not None and _inside(target, folder):
            raise VocabdriftError(f"{flag} {raw}: lies inside the model folder {folder}; vocabdrift never writes "
                                  f"into a model folder — pick a {kind} outside it")
    for spec in data:
        p = _local(spec)
        if p is None:
            continue
        if target == p:
            raise VocabdriftError(f"{flag} {raw}: is also an input; write to another {kind}")
        if p.is_dir() and _inside(target, p):
            raise VocabdriftError(f"{flag} {raw}: lies inside the data folder {p}, which is read as input; pick a "
                                  f"{kind} outside it")
    if file and is_run_folder(target.parent) and target.name in _contract_files():
        raise VocabdriftError(f"{flag} {raw}: is the run folder {target.parent}'s own {target.name}; vocabdrift never "
                              "overwrites a run folder's files with another output — pick another file name")
    if target.exists():
        if file and target.is_dir():
            raise VocabdriftError(f"{flag} {raw}: is a folder; {flag} takes the file to write, e.g. {raw}/out.jsonl")
        if file and not target.is_file():
            raise VocabdriftError(f"{flag} {raw}: exists and is not a regular file (a pipe, a device); pick a file")
        if not file and not target.is_dir():
            raise VocabdriftError(f"{flag} {raw}: exists and is not a folder; pick another {flag}")
        if not file and not ours(target, lab=lab):
            what = "lab folder (no lab.json)" if lab else "run folder (no manifest.json of vocabdrift's)"
            raise VocabdriftError(f"{flag} {raw}: exists, is not empty and is not a vocabdrift {what}; vocabdrift "
                                  f"writes only into folders it made — pick a new {kind}")
    _probe_writable(raw, target, flag, first_new=target.parent if file or not target.exists() else target)
    return raw


def _probe_writable(raw: Path, target: Path, flag: str, *, first_new: Path) -> None:
    """The nearest existing folder at or above `first_new` must be a folder that takes a new entry."""
    anchor = first_new
    while not anchor.exists() and not anchor.is_symlink():
        if anchor.parent == anchor:
            break
        anchor = anchor.parent
    if not anchor.is_dir():
        raise VocabdriftError(f"{flag} {raw}: {anchor} is a file, not a folder; pick a location under a folder")
    if str(anchor) in ("/proc", "/sys", "/dev") or any(str(anchor).startswith(p) for p in ("/proc/", "/sys/",
                                                                                          "/dev/")):
        raise VocabdriftError(f"{flag} {raw}: lies under {anchor}, a system folder; pick a location in your files")
    try:
        probe = tempfile.mkdtemp(dir=anchor, prefix=".vocabdrift-probe-")
        os.rmdir(probe)
    except OSError as e:
        raise VocabdriftError(f"{flag} {raw}: cannot write in {anchor} ({e.strerror or e}); pick a writable "
                              "location") from e


@functools.cache
def _contract_files() -> frozenset[str]:
    """The names a run folder's contract gives its files (outputs/run.py)."""
    from . import run as R

    return frozenset({R.VOCAB, R.DRIFT, R.NEIGHBORS, R.COVERAGE, R.COVERAGE_DRIFT, R.PROBE, R.UNDERTRAINED,
                      R.SUMMARY, R.MANIFEST, R.CASES, R.CONFUSION, R.CONFUSION_ANSWERS, R.EVALUATE, R.REPORT_HTML,
                      R.REPORT_MD})
