"""Huge pages for KV memory: the block pool's mapping and the vLLM engine's KV cache tensors."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.engines.hugepages import HUGE_PAGE, advise_range, advise_tensors
from workers.kv.pool import KvBlockPool

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vma_flags(addr: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds ``addr``."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside:
            key, _, val = line.partition(":")
            fields[key] = val.strip()
    return fields


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_pool_mapping_is_private_and_asks_for_huge_pages() -> None:
    pool = KvBlockPool(8, 128, 4096)  # 4 MiB
    pool.buffer[:] = 1
    flags = _vma_flags(pool.base_addr)
    assert flags.get("THPeligible") == "1", flags
    assert "hg" in flags.get("VmFlags", "").split(), flags  # madvise(MADV_HUGEPAGE)
    # private: no shared memory object behind it (shared anonymous memory follows shmem's THP setting)
    assert flags.get("Shared_Clean") == "0 kB" and flags.get("Shared_Dirty") == "0 kB", flags


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_kv_tensors_go_on_huge_pages_with_their_contents() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(16 << 20, dtype=torch.int32).to(torch.int8)  # 16 MiB, already on 4 KiB pages
    before = t.clone()
    # two views of one storage count once; a tensor without host memory is skipped
    advised, collapsed = advise_tensors([t[:10], t.view(-1, 4096), torch.zeros(4, device="meta")])
    assert 14 << 20 <= advised <= 16 << 20  # the whole 2 MiB pages inside the storage
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    flags = _vma_flags(start)
    assert "hg" in flags["VmFlags"].split(), flags
    if collapsed:  # MADV_COLLAPSE (Linux 6.1+): the pages are huge now
        assert collapsed == advised
        assert int(flags["AnonHugePages"].split()[0]) > 0, flags
    assert torch.equal(t, before)


def test_ranges_without_a_whole_huge_page_are_left_alone() -> None:
    assert advise_range(HUGE_PAGE + 1, HUGE_PAGE) == (0, 0)
