"""Where tensors are computed: CUDA when present (users bring their own torch), else the CPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def best_device(requested: str | None = None) -> torch.device:
    """`requested` if given ("cpu", "cuda:1"), else the first CUDA device, else Apple's MPS, else the CPU."""
    import torch

    if requested:
        return _checked_device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _checked_device(requested: str) -> torch.device:
    """The device the user named, refused in one line when it is not a device or is not here (torch would fail
    later, deep inside the first copy to it)."""
    import torch

    from .errors import VocabdriftError

    try:
        dev = torch.device(requested.strip())
    except (RuntimeError, ValueError, TypeError) as e:
        raise VocabdriftError(f"--device {requested!r}: not a device; use cpu, cuda, cuda:1 or mps") from e
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise VocabdriftError(f"--device {requested}: no CUDA device here (this torch, {torch.__version__}, "
                                  "sees none); use --device cpu, or leave --device out to take the best present")
        if dev.index is not None and dev.index >= n:
            raise VocabdriftError(f"--device {requested}: there are only {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise VocabdriftError(f"--device {requested}: Apple's MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise VocabdriftError(f"--device {requested}: vocabdrift runs on cpu, cuda or mps, not {dev.type}")
    return dev


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or `taskset`'s limit), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` (at least 1) for the block, then restored.

    Why: a pass that converts blocks on a read-ahead thread while the main thread computes runs two OpenMP teams
    at once; at full size each they contend for the same cores (a CPU diff ran 1.9x slower; bench/diff_bench.py).
    Threads started inside the block take the new count too.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def process_rank() -> int:
    """This process's rank under torchrun / `accelerate launch` (several GPUs); 0 when it runs alone."""
    return int(os.environ.get("RANK", "0"))


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
_kept = False


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks in the process instead of handing them back to the OS.

    Why: a training step on the CPU allocates and frees the same large activation tensors every step. By default
    glibc serves each with a fresh mmap (or trims the heap top after the free), so every step page-faults all of
    its activations in again: on the lab's default model a third of the step was kernel time (237 vs 155 ms per
    step; bench/allocator_bench.py). Raising the thresholds changes no number, only where freed memory waits.
    Process-wide, so it is called by the training functions only, and only once. Returns whether it took effect
    (False off glibc, e.g. on macOS or musl).
    """
    global _kept
    if _kept:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, (1 << 31) - 1),
                                                       (_M_TOP_PAD, 1 << 28)))
    except (OSError, AttributeError):
        return False
    _kept = ok
    return ok
