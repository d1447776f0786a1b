"""Transparent huge pages for host KV memory (vLLM's KV cache when the engine runs on CPU).

A KV transfer on one host (UCX's cma: ``process_vm_readv``) pins every page it touches on both sides: B's
READ of a 1000-token handoff took 6.2 ms on 4 KiB pages and 3.2-4.3 ms on 2 MiB pages (docs/vllm_engine.md,
"Huge pages"). vLLM allocates its KV cache with ``torch.zeros`` on 4 KiB
pages, before any connector sees it, so the connector advises the kernel to back the cache with huge pages
(``MADV_HUGEPAGE``) and collapses the pages already there at once (``MADV_COLLAPSE``, Linux 6.1 and later;
on older kernels khugepaged collapses them in the background). Only the KV cache: torch's own switch
(``THP_MEM_ALLOC_ENABLE``) puts every buffer of 2 MiB or more on huge pages, and the activations of long
prompts then kept about 250 MiB more resident in the benchmark's prefilling worker.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("dynaserve.hugepages")

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
MADV_COLLAPSE = 25  # linux/mman.h; not exported by Python's mmap module

_libc: Any = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def advise_range(addr: int, length: int) -> tuple[int, int]:
    """Ask for huge pages on the whole 2 MiB pages inside ``[addr, addr + length)`` and collapse them now.

    Returns (bytes advised, bytes collapsed); (0, 0) off Linux or where the kernel refuses."""
    lo = -(-addr // HUGE_PAGE) * HUGE_PAGE
    hi = (addr + length) // HUGE_PAGE * HUGE_PAGE
    if _libc is None or hi <= lo:
        return 0, 0
    start, size = ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo)
    if _libc.madvise(start, size, MADV_HUGEPAGE) != 0:
        log.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
        return 0, 0
    if _libc.madvise(start, size, MADV_COLLAPSE) != 0:
        log.debug("madvise(MADV_COLLAPSE) refused: errno %d", ctypes.get_errno())
        return hi - lo, 0
    return hi - lo, hi - lo


def advise_tensors(tensors: Iterable[Any]) -> tuple[int, int]:
    """``advise_range`` over the host memory behind ``tensors`` (each storage once; device tensors are
    skipped). Returns the summed (bytes advised, bytes collapsed)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if getattr(t.device, "type", "") != "cpu":
            continue
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    advised = collapsed = 0
    for ptr, nbytes in seen.items():
        a, c = advise_range(ptr, nbytes)
        advised, collapsed = advised + a, collapsed + c
    return advised, collapsed
