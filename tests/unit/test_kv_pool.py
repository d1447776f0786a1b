"""KvBlockPool: allocation, exhaustion, double free and token layout."""

from __future__ import annotations

import numpy as np
import pytest

from workers.kv.pool import KvBlockPool


def make_pool(num_blocks: int = 8, block_tokens: int = 4, bytes_per_token: int = 16) -> KvBlockPool:
    return KvBlockPool(num_blocks, block_tokens, bytes_per_token)


def test_geometry_and_buffer() -> None:
    pool = make_pool()
    assert pool.block_bytes == 64
    assert pool.buffer.shape == (8, 64)
    assert pool.buffer.dtype == np.uint8
    assert pool.buffer.flags.c_contiguous and pool.buffer.flags.writeable
    assert pool.base_addr == pool.buffer.ctypes.data
    assert pool.base_addr % 4096 == 0  # page-aligned
    assert pool.nbytes == 8 * 64
    assert pool.num_free == 8 and pool.num_used == 0


@pytest.mark.parametrize("args", [(0, 4, 16), (8, 0, 16), (8, 4, -1), (8, 4, 1.5)])
def test_rejects_bad_geometry(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        KvBlockPool(*args)


def test_blocks_for_tokens() -> None:
    pool = make_pool(block_tokens=4)
    assert [pool.blocks_for_tokens(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        pool.blocks_for_tokens(-1)


def test_alloc_free_roundtrip_lowest_first() -> None:
    pool = make_pool()
    a = pool.alloc(3)
    b = pool.alloc(2)
    assert a == [0, 1, 2] and b == [3, 4]
    assert pool.num_used == 5 and pool.num_free == 3
    assert all(pool.is_allocated(i) for i in a + b)
    pool.free(a)
    assert pool.num_used == 2 and not pool.is_allocated(0)
    assert pool.alloc(4) == [0, 1, 2, 5]  # freed ids are reused, lowest first
    assert pool.alloc(0) == []
    with pytest.raises(ValueError):
        pool.alloc(-1)


def test_exhaustion_is_all_or_nothing() -> None:
    pool = make_pool(num_blocks=4)
    assert pool.alloc(3) is not None
    assert pool.alloc(2) is None
    assert pool.num_free == 1  # nothing taken by the failed call
    assert pool.alloc(1) == [3]
    assert pool.alloc(1) is None


def test_double_free_and_bad_ids_raise_without_side_effects() -> None:
    pool = make_pool()
    ids = pool.alloc(3)
    assert ids is not None
    pool.free([ids[0]])
    with pytest.raises(ValueError):
        pool.free([ids[0]])
    with pytest.raises(ValueError):
        pool.free([ids[1], ids[1]])  # listed twice in one call
    with pytest.raises(ValueError):
        pool.free([ids[1], 99])  # out of range
    with pytest.raises(ValueError):
        pool.free([ids[2], 7])  # 7 never allocated
    assert pool.num_used == 2  # the failed calls freed nothing
    pool.free(ids[1:])
    assert pool.num_used == 0 and pool.num_free == 8


def test_token_slot_layout() -> None:
    pool = make_pool(num_blocks=8, block_tokens=4, bytes_per_token=16)
    blocks = [5, 2, 7]
    for pos in range(12):
        pool.token_slot(blocks, pos)[:] = pos + 1
    flat = pool.buffer.reshape(-1)
    for pos in range(12):
        block, off = blocks[pos // 4], (pos % 4) * 16
        start = block * pool.block_bytes + off
        assert (flat[start : start + 16] == pos + 1).all()
        assert pool.token_slot(blocks, pos).shape == (16,)
    # Untouched blocks stay zero.
    for b in (0, 1, 3, 4, 6):
        assert not pool.buffer[b].any()
    with pytest.raises(IndexError):
        pool.token_slot(blocks, 12)
    with pytest.raises(IndexError):
        pool.token_slot(blocks, -1)


def test_token_slot_is_a_view() -> None:
    pool = make_pool()
    slot = pool.token_slot([3], 1)
    slot[:] = 0xAB
    assert (pool.buffer[3, 16:32] == 0xAB).all()
    assert (pool.block_view(3)[16:32] == 0xAB).all()
