"""Checkpoints, read-only and lazy: only the vocabulary matrices are read, a block of rows at a time.

Like `safetensors.safe_open`, `open_checkpoint` only parses headers; `rows()` and `iter_blocks()` read the bytes of
the rows asked for, in the stored dtype, and hand back float32. Peak memory is a block of rows, whatever the size
of the rest of the checkpoint.

Formats: a Hugging Face folder (`model.safetensors`, or shards with `model.safetensors.index.json`), a single
`.safetensors` file, a `.gguf` file (dequantized block by block with the `gguf` package), a hub id (only the
shards that hold the vocabulary matrices are fetched), and pickle `.bin`/`.pt` files when the user opts in.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import VocabdriftError
from . import disk
from .spec import PICKLE_SUFFIXES as _PICKLE_SUFFIXES
from .spec import check_weights_policy, parse_model_spec, pickle_refused

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Kind = Literal["lm_head", "embed"]
KINDS: tuple[Kind, ...] = ("lm_head", "embed")

# Tensor names by role, most specific first. Prefixes (`model.`, `transformer.`, `language_model.`) are matched
# by suffix, so wrappers such as multimodal models resolve too.
_EMBED = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight", "token_embd.weight",
          "tok_embeddings.weight", "embeddings.weight")
_LM_HEAD = ("lm_head.weight", "embed_out.weight", "output.weight")
_LM_BIAS = ("lm_head.bias", "embed_out.bias", "output.bias")
_FINAL_NORM = ("model.norm.weight", "ln_f.weight", "final_layer_norm.weight", "output_norm.weight", "norm.weight",
               "final_layernorm.weight")

# float32 bytes of one block of one matrix: small enough that the several passes over a block hit the cache
DEFAULT_BLOCK_BYTES = 8 << 20


def _pick(names: list[str], suffixes: tuple[str, ...], *, exclude: tuple[str, ...] = ()) -> str | None:
    """The tensor name that plays a role: an exact match first, else the shortest name with a known suffix."""
    for s in suffixes:
        if s in names:
            return s
    for s in suffixes:
        hits = sorted((n for n in names if n.endswith("." + s) and not any(e in n for e in exclude)), key=len)
        if hits:
            return hits[0]
    return None


@dataclass
class _Tensor:
    """Where one 2-D tensor lives and how to read rows of it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    read: Any  # callable (start, stop) -> torch.Tensor | np.ndarray in the stored dtype, valid until the next read
    read_into: Any = None  # safetensors: callable (start, stop, buf) -> rows' stored bits in `buf` (any thread)


@dataclass
class Checkpoint:
    """The vocabulary matrices of one checkpoint, opened lazily.

    Attributes:
        path: what was opened. format: "safetensors", "gguf" or "pickle".
        vocab_size / hidden_size: rows and columns of the embedding matrix.
        tied: no separate output matrix (lm_head reads the embedding rows), detected from the stored tensors.
        config: config.json (or GGUF metadata) as a dict, when there is one.
    """

    path: Path
    format: str
    tensors: dict[str, _Tensor]  # role ("embed", "lm_head", "lm_head_bias", "final_norm") -> tensor
    config: dict[str, Any] = field(default_factory=dict)
    tied: bool = False
    # every stored tensor (safetensors): name -> (file, its header entry with "data_start"), for `nonfinite_tensors`
    stored: dict[str, tuple[Path, dict[str, Any]]] = field(default_factory=dict, repr=False)

    # ---- shape --------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tensors["embed"].shape[0]

    @property
    def hidden_size(self) -> int:
        return self.tensors["embed"].shape[1]

    def rows_of(self, kind: Kind) -> int:
        """Row count of a matrix (lm_head may be padded beyond the embedding, or the other way round)."""
        return self._tensor(kind).shape[0]

    def dtype(self, kind: Kind) -> str:
        return self._tensor(kind).dtype

    def tensor_name(self, kind: str) -> str | None:
        t = self.tensors.get(kind)
        return t.name if t is not None else None

    def _tensor(self, kind: Kind) -> _Tensor:
        if kind == "lm_head" and self.tied:
            return self.tensors["embed"]
        if kind not in KINDS:
            raise ValueError(f"kind must be 'lm_head' or 'embed', not {kind!r}")
        return self.tensors[kind]

    # ---- reading ------------------------------------------------------------------------------------------
    def bf16_bits(self, kind: Kind) -> bool:
        """The matrix is stored as bf16 in a file `rows_bits` can read from (safetensors)."""
        t = self._tensor(kind)
        return t.dtype == "BF16" and t.read_into is not None

    def bits_buffer(self, rows: int) -> np.ndarray:
        """A buffer for `rows_bits` of up to `rows` rows (page-aligned, for reads around the page cache)."""
        return disk.buffer(rows * self.hidden_size * 2)

    def rows_bits(self, kind: Kind, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Rows [start, stop) of a bf16 matrix as uint16 bits (stop - start, H): a view into `out`, from
        `bits_buffer` (one per block in flight, so a reading thread never overwrites a block in use)."""
        t = self._tensor(kind)
        if not self.bf16_bits(kind):
            raise ValueError(f"{t.name} is {t.dtype} in a {self.format} file; rows_bits reads bf16 safetensors only")
        stop = min(stop, t.shape[0])
        if out.nbytes < (stop - start) * t.shape[1] * 2 + 2 * disk.PAGE:
            raise ValueError(f"rows_bits: a buffer of {out.nbytes} bytes cannot hold {stop - start} rows; "
                             "use bits_buffer")
        try:
            return t.read_into(start, stop, out)
        except OSError as e:
            raise VocabdriftError(f"{self.path}: could not read rows {start}:{stop} of {t.name} ({e}); "
                                  "the file may be truncated or corrupt") from e

    def rows(self, kind: Kind, start: int, stop: int, *, device: str | torch.device | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of a matrix as float32 (stop - start, H), on `device` (default CPU).

        `out`, a float32 tensor of at least that many rows, is filled and a view of it returned: reusing one
        buffer per stream of blocks keeps memory flat and saves the page faults of a fresh allocation.
        """
        import torch

        t = self._tensor(kind)
        stop = min(stop, t.shape[0])
        try:
            block = t.read(start, stop)
        except (OSError, ValueError, RuntimeError) as e:
            raise VocabdriftError(f"{self.path}: could not read rows {start}:{stop} of {t.name} ({e}); "
                                  "the file may be truncated or corrupt") from e
        if isinstance(block, np.ndarray):
            block = torch.from_numpy(np.ascontiguousarray(block))
        if out is not None:
            dst = out[: stop - start]
            dst.copy_(block, non_blocking=True)
            return dst
        return block.to(device=device or "cpu", dtype=torch.float32, copy=True)

    def rows_np(self, kind: Kind, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 numpy, without torch where the format allows (safetensors of bf16, f16,
        f32, f64; GGUF): a lookup of a few rows should not pay torch's second of start-up."""
        t = self._tensor(kind)
        stop = min(stop, t.shape[0])
        floats = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
        if t.read_into is None or t.dtype not in floats:
            return _to_numpy(self.rows(kind, start, stop))  # pickle, float8: through torch
        width = np.dtype(floats[t.dtype]).itemsize
        try:
            bits = t.read_into(start, stop, disk.buffer((stop - start) * t.shape[1] * width))
        except OSError as e:
            raise VocabdriftError(f"{self.path}: could not read rows {start}:{stop} of {t.name} ({e}); "
                                  "the file may be truncated or corrupt") from e
        if t.dtype == "BF16":
            return (bits.astype(np.uint32) << 16).view(np.float32)
        return bits.view(floats[t.dtype]).astype(np.float32)

    def iter_blocks(self, kind: Kind, *, block_rows: int | None = None, stop: int | None = None,
                    device: str | torch.device | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start, rows) blocks covering the matrix; `block_rows` defaults to DEFAULT_BLOCK_BYTES of float32."""
        n = min(self.rows_of(kind), stop) if stop is not None else self.rows_of(kind)
        step = block_rows or max(1, DEFAULT_BLOCK_BYTES // (4 * self.hidden_size))
        for s in range(0, n, step):
            yield s, self.rows(kind, s, min(n, s + step), device=device)

    def lm_head_bias(self) -> np.ndarray | None:
        t = self.tensors.get("lm_head_bias")
        return None if t is None else _to_numpy(t.read(0, t.shape[0]))

    def final_norm(self) -> np.ndarray | None:
        """The final norm's weight g (H,): logits are W·(g⊙x̂), so g scales every lm_head row's columns alike."""
        t = self.tensors.get("final_norm")
        return None if t is None else _to_numpy(t.read(0, t.shape[0]))

    def nonfinite_tensors(self, *, chunk_bytes: int = 64 << 20) -> list[str]:
        """Names of the stored float tensors holding NaN or Inf, every weight of the model read a chunk at a time
        (memory: one chunk): a NaN in any layer makes every logit NaN, whatever the vocabulary rows say. A float's
        exponent bits all set is NaN or Inf, tested on the raw bits without converting. Safetensors only (other
        formats: [], and their matrices are checked row by row as they are read)."""
        out = []
        buf = np.empty(chunk_bytes, dtype=np.uint8)  # one buffer, read into: no copy per chunk
        scratch = np.empty(chunk_bytes // 2, dtype=np.uint16)
        for name, (path, info) in sorted(self.stored.items()):
            dtype = info.get("dtype")
            if dtype not in _FLOATS_NP:
                continue
            width = np.dtype(_FLOATS_NP[dtype]).itemsize
            begin, end = (info["data_start"] + int(o) for o in info["data_offsets"])
            try:
                with open(path, "rb", buffering=0) as f:
                    f.seek(begin)
                    left = end - begin
                    while left > 0:
                        got = f.readinto(memoryview(buf)[: min(chunk_bytes - chunk_bytes % width, left)])
                        if not got:
                            break
                        left -= got
                        v = buf[: got - got % width].view(_FLOATS_NP[dtype])
                        if dtype == "BF16":  # no numpy bf16: every exponent bit set is NaN or Inf
                            m = np.bitwise_and(v, 0x7F80, out=scratch[: len(v)])
                            bad = bool((m == 0x7F80).any())
                        else:
                            bad = not bool(np.isfinite(v).all())
                        if bad:
                            out.append(name)
                            break
            except OSError as e:
                raise VocabdriftError(f"{path}: could not read {name} ({e}); the file may be truncated") from e
        return out

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this checkpoint."""
        return {"path": str(self.path), "format": self.format, "tied": self.tied, "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "tensors": {k: {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}
                            for k, t in self.tensors.items()}}


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.float32)
    return x.float().cpu().numpy()


# ---- safetensors ----------------------------------------------------------------------------------------------

def _check_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header ourselves, so a truncated file or a lying header gets a clear
    error instead of a crash deep inside a read, or worse, made-up numbers.

    Checked as the reference reader does: the header is a JSON object of objects; each tensor has a dtype, a
    shape of non-negative integers and two integer offsets inside the data section; the tensors tile the data
    section without gaps or overlaps; and each tensor's byte length is its element count times its dtype's size
    (a shape claiming more rows than the bytes hold would otherwise invent rows)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise VocabdriftError(f"{path}: too short to be a safetensors file ({size} bytes); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                raise VocabdriftError(f"{path}: safetensors header claims {n} bytes but the file has {size}; "
                                      "the file is truncated or not safetensors — re-download it")
            raw = f.read(n)
    except OSError as e:  # a folder named *.safetensors, a symlink loop, no permission
        raise VocabdriftError(f"{path}: cannot be read ({e.strerror or e}); pass a safetensors file") from e
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise VocabdriftError(f"{path}: safetensors header is not valid JSON ({e}); re-download the file") from e
    bad = f"{path}: not a valid safetensors file: "
    fix = "; re-download or re-convert the checkpoint"
    if not isinstance(header, dict):
        raise VocabdriftError(f"{bad}the header is a JSON {type(header).__name__}, not an object{fix}")
    data_len = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise VocabdriftError(f"{bad}__metadata__ is a {type(info).__name__}, not an object{fix}")
            continue
        if not isinstance(info, dict):
            raise VocabdriftError(f"{bad}tensor {name!r} is a {type(info).__name__}, not an object{fix}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise VocabdriftError(f"{bad}tensor {name!r} has no dtype{fix}")
        if not isinstance(shape, list) or not all(_is_int(x) and x >= 0 for x in shape):
            raise VocabdriftError(f"{bad}tensor {name!r} has shape {shape!r}, not a list of non-negative "
                                  f"integers{fix}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) for x in offsets)):
            raise VocabdriftError(f"{bad}tensor {name!r} has data_offsets {offsets!r}, not two integers{fix}")
        begin, end = offsets
        if begin < 0 or begin > end:
            raise VocabdriftError(f"{bad}tensor {name!r} has data_offsets {begin}:{end}, which do not make a "
                                  f"range{fix}")
        if end > data_len:
            raise VocabdriftError(f"{path}: tensor {name} lies at bytes {begin}:{end} but the data section has "
                                  f"{data_len} bytes; the file is truncated — re-download it")
        itemsize = _ST_ITEMSIZE.get(dtype)
        if itemsize is not None:
            want = int(np.prod(shape, dtype=object)) * itemsize if shape else itemsize
            if end - begin != want:
                raise VocabdriftError(f"{bad}tensor {name!r} claims shape {shape} of {dtype} ({want:,} bytes) but "
                                      f"holds {end - begin:,} bytes{fix}")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:], strict=False):  # overlaps first: the worse lie
        if b1 < e0 and e1 > b1:
            raise VocabdriftError(f"{bad}tensors {n0!r} ({b0}:{e0}) and {n1!r} ({b1}:{e1}) overlap{fix}")
    at = 0
    for begin, end, _ in spans:
        if begin != at:
            raise VocabdriftError(f"{bad}bytes {at}:{begin} of the data section belong to no tensor{fix}")
        at = end
    if at != data_len:
        raise VocabdriftError(f"{bad}the tensors end at byte {at:,} of a {data_len:,}-byte data section{fix}")
    return header, 8 + n


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# bytes per element of every safetensors dtype (sub-byte types, F4 and F6, have none: their lengths are not checked)
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}


# safetensors dtype -> (torch dtype name, bytes per element)
_ST_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
              "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
              "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}


def _safetensors_tensor(path: Path, name: str, info: dict[str, Any], data_start: int) -> _Tensor:
    """Rows are read with `os.preadv` of exactly their bytes (`disk.read`: around the page cache when they are not
    in it), not through a memory map: a map would leave every page it touched resident, so reading two 1 GB
    matrices would show as 2 GB of process memory.

    Opening does not import torch (only a float8 tensor needs it, to check this torch has the type), so a bad
    checkpoint is reported before torch's seconds of start-up."""
    dtype_name, itemsize = _ST_DTYPES.get(info["dtype"], (None, 0))
    if dtype_name is None or (dtype_name.startswith("float8") and not _torch_has(dtype_name)):
        raise VocabdriftError(f"{path}: tensor {name} has dtype {info['dtype']}, which this torch cannot read; "
                              "upgrade torch or convert the checkpoint")
    shape = tuple(info["shape"])
    row_bytes = itemsize * (int(np.prod(shape[1:])) if len(shape) > 1 else 1)
    begin = data_start + info["data_offsets"][0]
    scratch = disk.buffer(0)  # reused between reads: a fresh buffer per block costs more in page faults than the copy

    def pread(start: int, stop: int, rb: int, buf: np.ndarray) -> np.ndarray:
        ahead = min(stop - start, shape[0] - stop) * rb if len(shape) > 1 else 0  # blocks are read in order
        try:
            got = disk.read(path, begin + start * rb, (stop - start) * rb, buf, ahead=ahead)
        except EOFError as e:
            raise VocabdriftError(f"{path}: tensor {name} ends early ({e}); the file is truncated — re-download it"
                                  ) from e
        if got.ctypes.data % itemsize:  # an odd offset (a writer that does not pad the header like safetensors)
            buf[: len(got)] = got  # numpy copies overlapping ranges correctly
            got = buf[: len(got)]
        return got

    def read(start: int, stop: int) -> Any:
        import torch

        nonlocal scratch
        dtype = getattr(torch, dtype_name)
        if len(shape) == 1:
            start, stop, rb = 0, 1, row_bytes * shape[0]
        else:
            rb = row_bytes
        if len(scratch) < rb * (stop - start) + 2 * disk.PAGE:
            scratch = disk.buffer(rb * (stop - start))
        t = torch.frombuffer(pread(start, stop, rb, scratch), dtype=dtype)
        return t.reshape(stop - start, *shape[1:]) if len(shape) > 1 else t.clone()

    def read_into(start: int, stop: int, buf: np.ndarray) -> np.ndarray:
        """Rows [start, stop) of a 2-D tensor as their stored bits (stop - start, H), a view into `buf` (from
        `Checkpoint.bits_buffer`, reused by the caller)."""
        return pread(start, stop, row_bytes, buf.view(np.uint8)).view(_BITS[itemsize]).reshape(stop - start,
                                                                                              shape[1])

    return _Tensor(name=name, shape=shape, dtype=info["dtype"], read=read,
                   read_into=read_into if len(shape) == 2 else None)


_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# the numpy view of each float type `nonfinite_tensors` reads (bf16 as its bits)
_FLOATS_NP = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}


def _torch_has(dtype_name: str) -> bool:
    import torch

    return getattr(torch, dtype_name, None) is not None


def _open_safetensors(files: list[Path], *, where: Path, config: dict[str, Any]) -> Checkpoint:
    located: dict[str, tuple[Path, dict[str, Any]]] = {}
    for f in files:
        header, data_start = _check_safetensors_header(f)
        for name, info in header.items():
            if name != "__metadata__":
                located[name] = (f, {**info, "data_start": data_start})
    ck = _assemble(where, "safetensors", located,
                   lambda f, name, info: _safetensors_tensor(f, name, info, info["data_start"]), config)
    ck.stored = located
    return ck


def _assemble(where: Path, fmt: str, located: dict[str, tuple[Any, dict[str, Any]]], make: Any,
              config: dict[str, Any]) -> Checkpoint:
    names = list(located)
    embed = _pick(names, _EMBED, exclude=("position", "vision", "visual", "audio"))
    if embed is None:
        raise VocabdriftError(f"{where}: no token embedding among {len(names)} tensors (looked for names ending in "
                              f"{', '.join(_EMBED[:4])}, ...); is this a language model checkpoint?")
    lm_head = _pick(names, _LM_HEAD)
    tensors = {"embed": make(*located[embed][:1], embed, located[embed][1])}
    for role, name in (("lm_head", lm_head), ("lm_head_bias", _pick(names, _LM_BIAS)),
                       ("final_norm", _pick(names, _FINAL_NORM))):
        if name is not None:
            tensors[role] = make(located[name][0], name, located[name][1])
    if len(tensors["embed"].shape) != 2:
        raise VocabdriftError(f"{where}: {embed} has shape {tensors['embed'].shape}, expected (vocab, hidden)")
    tied = "lm_head" not in tensors
    if not tied and tensors["lm_head"].shape[1] != tensors["embed"].shape[1]:
        raise VocabdriftError(f"{where}: {lm_head} has {tensors['lm_head'].shape[1]} columns but {embed} has "
                              f"{tensors['embed'].shape[1]}; the checkpoint is inconsistent")
    if tied and config.get("tie_word_embeddings") is False:
        raise VocabdriftError(f"{where}: config.json says tie_word_embeddings=false but no lm_head tensor is "
                              "stored; the checkpoint is incomplete")
    return Checkpoint(path=where, format=fmt, tensors=tensors, config=config, tied=tied)


# ---- GGUF -----------------------------------------------------------------------------------------------------

def _open_gguf(path: Path) -> Checkpoint:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (ValueError, OSError, struct.error, IndexError) as e:
        raise VocabdriftError(f"{path}: not a readable GGUF file ({e}); re-download or re-convert it") from e
    config = {}
    for k in ("general.architecture", "general.name"):
        if k in reader.fields:
            f = reader.fields[k]
            config[k] = bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
    by_name = {t.name: t for t in reader.tensors}

    def make(_where: Any, name: str, _info: dict[str, Any]) -> _Tensor:
        t = by_name[name]
        qtype = t.tensor_type
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists ne0 (columns) first

        def read(start: int, stop: int) -> np.ndarray:
            data = t.data[start:stop] if len(shape) > 1 else t.data
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                return np.array(data)  # a copy: the memory map is read-only
            return gguf.quants.dequantize(np.asarray(data), qtype)  # dequantized for these rows only

        return _Tensor(name=name, shape=shape, dtype=qtype.name, read=read)

    return _assemble(path, "gguf", {n: (path, {}) for n in by_name}, make, config)


# ---- pickle ---------------------------------------------------------------------------------------------------

def _open_pickle(files: list[Path], *, where: Path, config: dict[str, Any]) -> Checkpoint:
    """Loaded with `torch.load(weights_only=True, mmap=True)`: no code runs, and tensors stay on disk until read."""
    import torch

    located: dict[str, tuple[Any, dict[str, Any]]] = {}
    for f in files:
        try:
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise VocabdriftError(f"{f}: could not be loaded safely ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); convert it to safetensors") from e
        for name, t in sd.items():
            if isinstance(t, torch.Tensor):
                located[name] = (t, {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")})

    def make(t: Any, name: str, info: dict[str, Any]) -> _Tensor:
        return _Tensor(name=name, shape=tuple(info["shape"]), dtype=info["dtype"],
                       read=lambda a, b: t[a:b] if t.dim() > 1 else t)

    return _assemble(where, "pickle", located, make, config)


# ---- resolving what the user named ----------------------------------------------------------------------------

def _read_json_object(p: Path, what: str) -> dict[str, Any]:
    """A small JSON file that must hold an object (config.json, a shard index): any other content is one clear
    error naming the file."""
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise VocabdriftError(f"{p}: not valid JSON ({e}); fix or re-download the {what}") from e
    except OSError as e:
        raise VocabdriftError(f"{p}: cannot be read ({e.strerror or e}); it should be the {what} file") from e
    if not isinstance(obj, dict):
        raise VocabdriftError(f"{p}: holds a JSON {type(obj).__name__}, not an object; fix or re-download the {what}")
    return obj


def _read_config(folder: Path) -> dict[str, Any]:
    p = folder / "config.json"
    if not p.exists():
        return {}
    cfg = _read_json_object(p, "model config")
    text = cfg.get("text_config")  # multimodal wrappers keep the language model's settings here
    if isinstance(text, dict) and "tie_word_embeddings" not in cfg and "tie_word_embeddings" in text:
        cfg["tie_word_embeddings"] = text["tie_word_embeddings"]
    return cfg


def _weight_map(index: Path) -> dict[str, str]:
    """A shard index's weight_map (tensor name -> shard file), checked: an object of file names, each inside the
    index's folder (an entry such as ../../etc/passwd is refused, never followed)."""
    weight_map = _read_json_object(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise VocabdriftError(f"{index}: not a valid shard index (no \"weight_map\" object of tensor name -> file "
                              "name); re-download it")
    for f in set(weight_map.values()):
        # judged on the name, not the resolved path: a hub cache's shards are links into its blob store
        norm = os.path.normpath(f)
        if not f or os.path.isabs(f) or norm == ".." or norm.startswith(".." + os.sep):
            raise VocabdriftError(f"{index}: names shard {f!r}, which lies outside the model folder; refusing to "
                                  "read it — fix the index")
    return weight_map


def _shards_from_index(index: Path) -> list[Path]:
    weight_map = _weight_map(index)
    names = list(weight_map)
    wanted = {n for n in (_pick(names, _EMBED, exclude=("position", "vision", "visual", "audio")),
                          _pick(names, _LM_HEAD), _pick(names, _LM_BIAS), _pick(names, _FINAL_NORM)) if n}
    files = sorted({weight_map[n] for n in wanted})
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise VocabdriftError(f"{index.parent}: shard {missing[0]} named in {index.name} is missing; "
                              "download the whole checkpoint")
    return [index.parent / f for f in files]


def _open_folder(folder: Path, *, allow_pickle: bool) -> Checkpoint:
    config = _read_config(folder)
    if (folder / "model.safetensors").is_file():  # what transformers loads first, a stale shard index beside it
        return _open_safetensors([folder / "model.safetensors"], where=folder, config=config)  # notwithstanding
    for index_name in ("model.safetensors.index.json", "pytorch_model.safetensors.index.json"):
        if (folder / index_name).exists():
            return _open_safetensors(_shards_from_index(folder / index_name), where=folder, config=config)
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return _open_safetensors(st, where=folder, config=config)
    gg = sorted(folder.glob("*.gguf"))
    if len(gg) == 1:
        return _open_gguf(gg[0])
    if len(gg) > 1:
        raise VocabdriftError(f"{folder}: holds {len(gg)} .gguf files; name the one to read")
    pk = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if (folder / "pytorch_model.bin.index.json").exists():
        pk = [folder / f for f in sorted(set(_weight_map(folder / "pytorch_model.bin.index.json").values()))]
    if pk:
        if not allow_pickle:
            raise pickle_refused(folder / pk[0].name)
        return _open_pickle(pk, where=folder, config=config)
    raise VocabdriftError(f"{folder}: no weights found (no .safetensors, .gguf or shard index); "
                          "pass a model folder or a weights file")


def _open_hub(repo_id: str, *, revision: str | None, allow_pickle: bool) -> Checkpoint:
    """Fetch only config, index and the shards holding the vocabulary matrices, then open the local copy."""
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        files = list_repo_files(repo_id, revision=revision)
        local = None
        for small in ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"):
            if small in files:
                local = Path(hf_hub_download(repo_id, small, revision=revision)).parent
        if "model.safetensors.index.json" in files:
            weight_map = json.loads((local / "model.safetensors.index.json").read_text())["weight_map"]
            names = list(weight_map)
            wanted = {n for n in (_pick(names, _EMBED), _pick(names, _LM_HEAD), _pick(names, _FINAL_NORM)) if n}
            for shard in sorted({weight_map[n] for n in wanted}):
                hf_hub_download(repo_id, shard, revision=revision)
        else:
            for f in files:
                if f.endswith((".safetensors", ".gguf")) and "/" not in f:
                    local = Path(hf_hub_download(repo_id, f, revision=revision)).parent
                    break
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError, KeyError) as e:  # ValueError: a bad id
        raise VocabdriftError(f"{repo_id}: not a local path, and the hub could not be reached or has no such "
                              f"model ({type(e).__name__}); check the name or the network") from e
    if local is None:
        raise VocabdriftError(f"{repo_id}: the hub repository has no config or weights")
    return _open_folder(local, allow_pickle=allow_pickle)


def open_checkpoint(spec: str | os.PathLike, *, allow_pickle: bool = False, revision: str | None = None) -> Checkpoint:
    """Open a checkpoint's vocabulary matrices lazily.

    Args:
        spec: a model folder, a `.safetensors`/`.gguf` file, a shard index, or a hub id.
        allow_pickle: accept `.bin`/`.pt` pickles (loaded with `torch.load(weights_only=True)`).
        revision: hub revision for a hub id.

    Returns:
        A `Checkpoint`; read rows with `.rows(kind, start, stop)` or `.iter_blocks(kind)`.

    Example:
        >>> ck = open_checkpoint("Qwen/Qwen2.5-7B")
        >>> for start, block in ck.iter_blocks("lm_head"): ...
    """
    ms = parse_model_spec(spec)  # the one parser: `~` expanded, a hub id only when no such path exists
    if ms.kind == "hub":
        return _open_hub(str(ms.hub_id), revision=revision, allow_pickle=allow_pickle)
    p = ms.path
    assert p is not None
    if ms.kind == "folder":
        return _open_folder(p, allow_pickle=allow_pickle)
    if p.is_file():
        if p.suffix == ".safetensors":
            return _open_safetensors([p], where=p, config=_read_config(p.parent))
        if p.suffix == ".gguf":
            return _open_gguf(p)
        if p.name.endswith(".index.json"):
            return _open_safetensors(_shards_from_index(p), where=p.parent, config=_read_config(p.parent))
        if p.suffix in _PICKLE_SUFFIXES:
            check_weights_policy(ms, allow_pickle=allow_pickle)
            return _open_pickle([p], where=p, config=_read_config(p.parent))
    raise VocabdriftError(f"{p}: unknown checkpoint format; expected .safetensors, .gguf, a shard index or a "
                          "model folder")
