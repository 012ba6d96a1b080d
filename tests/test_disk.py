"""Reads around the page cache (O_DIRECT) give the same bytes as reads through it, and fail the same way."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from factory import evict

from vocabdrift.errors import VocabdriftError
from vocabdrift.sources import disk
from vocabdrift.sources.checkpoint import open_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")


def _direct_here(folder: Path) -> bool:
    """O_DIRECT opens a file in `folder`."""
    probe = folder / "probe"
    probe.write_bytes(b"\0" * disk.PAGE)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


@pytest.fixture
def direct(tmp_path: Path) -> Iterator[Path]:
    """A folder on a file system that takes O_DIRECT: the test's own, else one beside the tests (a /tmp in memory
    refuses O_DIRECT on older kernels; the checkout is on a disk)."""
    assert disk.direct_io(), "VOCABDRIFT_DIRECT_IO=0 is set, or libc has no mincore: these tests read around the cache"
    if _direct_here(tmp_path):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as d:
        assert _direct_here(Path(d)), f"neither {tmp_path} nor {d} takes O_DIRECT"
        yield Path(d)


def test_uncached_range_is_read_around_the_cache(direct: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, 3 * disk.PAGE * 100 + 123, dtype=np.uint8).tobytes()
    f = direct / "blob"
    f.write_bytes(data)
    evict(f)
    assert not disk.resident(f, 0, len(data))
    for offset, n in [(0, disk.PAGE), (1, 1), (4095, 2), (5000, 70_001), (len(data) - 77, 77)]:
        buf = disk.buffer(n)
        got = disk.read(f, offset, n, buf)
        assert got.tobytes() == data[offset: offset + n]
        assert np.shares_memory(got, buf)
    assert not disk.resident(f, 0, len(data))  # the bytes did not pass through the page cache
    with pytest.raises(EOFError):
        disk.read(f, len(data) - 10, 20, disk.buffer(20))
    # once cached, the range is copied from the cache: the same bytes, at the buffer's start
    f.read_bytes()
    assert disk.resident(f, 5000, 70_001)
    buf = disk.buffer(70_001)
    got = disk.read(f, 5000, 70_001, buf)
    assert got.tobytes() == data[5000:75_001] and got.ctypes.data == buf.ctypes.data


def test_switched_off_reads_through_the_cache(direct: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = direct / "blob"
    f.write_bytes(bytes(range(256)) * 64)
    evict(f)
    monkeypatch.setenv("VOCABDRIFT_DIRECT_IO", "0")
    assert disk.read(f, 10, 1000, disk.buffer(1000)).tobytes() == (bytes(range(256)) * 64)[10:1010]
    assert disk.resident(f, 10, 1000)
    with pytest.raises(EOFError):
        disk.read(f, 16_000, 1000, disk.buffer(1000))


def _unpadded_safetensors(path: Path, w: np.ndarray) -> None:
    """A bf16 safetensors file whose data starts at an odd byte (a header not padded to 8, as some writers do)."""
    bits = (w.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    header = {"model.embed_tokens.weight": {"dtype": "BF16", "shape": list(w.shape),
                                            "data_offsets": [0, bits.nbytes]}}
    h = json.dumps(header).encode()
    if len(h) % 2 == 0:  # odd length: 8 + len(h) is odd
        h += b" "
    assert (8 + len(h)) % 2 == 1
    path.write_bytes(struct.pack("<Q", len(h)) + h + bits.tobytes())


def test_rows_bits_around_the_cache_at_an_odd_offset(direct: Path) -> None:
    w = np.random.default_rng(1).standard_normal((1000, 96)).astype(np.float32)
    f = direct / "model.safetensors"
    _unpadded_safetensors(f, w)
    expect = (w.view(np.uint32) >> 16).astype(np.uint16)
    ck = open_checkpoint(f)
    evict(f)
    buf = ck.bits_buffer(300)
    for s, e in [(0, 300), (300, 600), (999, 1000), (700, 1000)]:
        got = ck.rows_bits("embed", s, e, buf)
        assert got.dtype == np.uint16 and got.shape == (e - s, 96)
        np.testing.assert_array_equal(got, expect[s:e])
    with pytest.raises(ValueError, match="bits_buffer"):
        ck.rows_bits("embed", 0, 300, np.empty(300 * 96, np.uint16))


def test_truncated_file_read_around_the_cache_is_reported(direct: Path) -> None:
    w = np.ones((400, 64), dtype=np.float32)
    f = direct / "model.safetensors"
    _unpadded_safetensors(f, w)
    ck = open_checkpoint(f)
    with open(f, "r+b") as fh:  # cut after opening: the header's sizes were checked before
        fh.truncate(f.stat().st_size - 1000)
    evict(f)
    with pytest.raises(VocabdriftError, match="truncated"):
        for s in range(0, 400, 100):
            ck.rows_bits("embed", s, s + 100, ck.bits_buffer(100))


def test_refused_direct_read_falls_back_to_the_cache(direct: Path) -> None:
    """A file system that refuses O_DIRECT answers EINVAL, as the kernel does for memory not aligned to the
    device's blocks: the read declines, the file is remembered, and `read` goes through the page cache."""
    f = direct / "blob"
    data = bytes(range(256)) * 100
    f.write_bytes(data)
    evict(f)
    misaligned = disk.buffer(20_000 + disk.PAGE)[1:]
    assert disk._read_direct(f, 0, 20_000, misaligned) is None and f in disk._no_direct
    assert disk.read(f, 3, 20_000, disk.buffer(20_000)).tobytes() == data[3:20_003]
    assert disk.resident(f, 3, 20_000)  # through the cache, now that the file is known to refuse
