"""Byte ranges of files, read from the page cache when they are there and around it (O_DIRECT) when they are not.

Why: a cold read through the page cache costs the kernel a fresh page and a copy for every 4 KiB, and on a virtual
machine fresh pages are dear. Reading the two 1 GB matrices of a 7B pair that way took 2.5-9.4 s of system CPU
here, most of a core that the arithmetic and the vocabulary table need; read with O_DIRECT into a reused buffer,
the same bytes cost 0.2-0.3 s of CPU and arrived faster (bench/diff_bench.py, `floor` against `floor_direct`).
Ranges already cached (a checkpoint just written or read) are copied from the cache, which is faster than the disk.

Linux only; elsewhere, on file systems without O_DIRECT (tmpfs), or with VOCABDRIFT_DIRECT_IO=0, every read goes
through the page cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import mmap
import os
from pathlib import Path

import numpy as np

PAGE = 4096  # O_DIRECT wants offsets, lengths and memory aligned to the device's block (512 B or 4 KiB)
_no_direct: set[Path] = set()  # files whose file system refused O_DIRECT


def direct_io() -> bool:
    """O_DIRECT reads are possible here and not switched off (VOCABDRIFT_DIRECT_IO=0)."""
    return hasattr(os, "O_DIRECT") and os.environ.get("VOCABDRIFT_DIRECT_IO", "1") != "0" and _libc() is not None


def buffer(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 buffer into which `read` can read `nbytes` from any offset (two pages of slack)."""
    raw = np.empty(nbytes + 3 * PAGE, dtype=np.uint8)
    skip = -raw.ctypes.data % PAGE
    return raw[skip: skip + nbytes + 2 * PAGE]


def read(path: Path, offset: int, nbytes: int, buf: np.ndarray, *, ahead: int = 0) -> np.ndarray:
    """`nbytes` of `path` from `offset`, as a uint8 view into `buf` (from `buffer`), valid until `buf` is reused.

    The view starts at `offset % PAGE` into `buf` when the bytes came around the page cache. `ahead`: bytes after
    the range that will be read next, which the kernel is asked to fetch now when reads go through the page cache.
    Raises EOFError when the file ends first, and OSError as the system gives it.
    """
    if path not in _no_direct and direct_io() and buf.ctypes.data % PAGE == 0 and not resident(path, offset, nbytes):
        got = _read_direct(path, offset, nbytes, buf)
        if got is not None:
            return got
    with open(path, "rb", buffering=0) as f:
        got = os.preadv(f.fileno(), [memoryview(buf)[:nbytes]], offset)
        if ahead > 0 and hasattr(os, "posix_fadvise") and (path in _no_direct or not direct_io()):
            # the disk works on the next block while this one is computed (a cold pass: 6.2 against 6.7 s)
            os.posix_fadvise(f.fileno(), offset + nbytes, ahead, os.POSIX_FADV_WILLNEED)
    if got != nbytes:
        raise EOFError(f"got {got} of {nbytes} bytes")
    return buf[:nbytes]


def _read_direct(path: Path, offset: int, nbytes: int, buf: np.ndarray) -> np.ndarray | None:
    """`read` around the page cache; None where the file system will not (the file is then read through it)."""
    start = offset - offset % PAGE
    length = -(-(offset + nbytes - start) // PAGE) * PAGE
    if length > len(buf):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            got = os.preadv(fd, [memoryview(buf)[:length]], start)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: no O_DIRECT on this file system, or not at this alignment
            raise
        _no_direct.add(path)
        return None
    if got < offset - start + nbytes:
        raise EOFError(f"got {max(0, got - (offset - start))} of {nbytes} bytes")
    return buf[offset - start: offset - start + nbytes]


def resident(path: Path, offset: int, nbytes: int) -> bool:
    """Every page of the range is in the page cache (mincore on a mapping of it; nothing is read)."""
    libc = _libc()
    if libc is None or nbytes <= 0:
        return False
    start = offset - offset % mmap.PAGESIZE
    length = offset + nbytes - start
    pages = -(-length // mmap.PAGESIZE)
    with open(path, "rb", buffering=0) as f:
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), start)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return False
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), length, vec) != 0:
                return False
            return bool((np.frombuffer(vec, dtype=np.uint8) & 1).all())
        finally:
            libc.munmap(ctypes.c_void_p(addr), length)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """libc with mmap, mincore and munmap typed, or None where there is none (not Linux)."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int64]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc
