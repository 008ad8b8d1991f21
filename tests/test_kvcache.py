"""The running batch's KV cache (server.kvcache): appends in place, never into a view handed out."""

from __future__ import annotations

import torch

from server.kvcache import ROOM, RoomLayer, fork, room_cache, select_rows, stack_left


def kv(b=2, h=3, n=1, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


def test_appending_equals_concatenation_across_reallocations():
    layer, ks, vs = RoomLayer(), [], []
    for step in range(2 * ROOM + 5):  # past two reallocations
        k, v = kv(n=7 if step == 0 else 1, seed=step)  # a prefill, then decode columns
        keys, values = layer.update(k, v)
        ks.append(k)
        vs.append(v)
        assert torch.equal(keys, torch.cat(ks, dim=2)) and torch.equal(values, torch.cat(vs, dim=2))
    assert layer.get_seq_length() == 7 + 2 * ROOM + 4


def test_a_decode_column_is_written_in_place_until_the_room_runs_out():
    layer = RoomLayer()
    layer.update(*kv(n=5))
    buf = layer._kbuf.data_ptr()
    for step in range(ROOM):
        layer.update(*kv(seed=step + 1))
        assert layer.keys.data_ptr() == buf  # no copy of the cache for this column
    layer.update(*kv(seed=99))
    assert layer.keys.data_ptr() != buf  # room exhausted: one reallocation


def test_views_taken_before_an_update_still_hold_the_cache_as_it_was():
    """What server.isolation's snapshot of a failed decode relies on."""
    layer = RoomLayer()
    layer.update(*kv(n=4))
    before_k, before_v = layer.keys, layer.values
    copy_k, copy_v = before_k.clone(), before_v.clone()
    layer.update(*kv(seed=5))
    layer.update(*kv(seed=6))
    assert before_k.shape[2] == 4 and torch.equal(before_k, copy_k) and torch.equal(before_v, copy_v)


def test_a_fork_appends_without_changing_the_original():
    cache = room_cache()
    cache.update(*kv(n=6), layer_idx=0)
    orig_k = cache.layers[0].keys.clone()
    child = fork(cache)
    child.update(*kv(n=3, seed=4), layer_idx=0)
    assert torch.equal(cache.layers[0].keys, orig_k) and cache.get_seq_length() == 6
    assert child.get_seq_length() == 9 and torch.equal(child.layers[0].keys[:, :, :6], orig_k)
    assert child.layers[0].keys.data_ptr() == cache.layers[0].keys.data_ptr()  # shared, not copied


def test_stacking_left_pads_with_zeros_and_keeps_room():
    a, b = room_cache(), room_cache()
    a.update(*kv(b=2, n=5, seed=1), layer_idx=0)
    b.update(*kv(b=1, n=3, seed=2), layer_idx=0)
    both = stack_left([a, b], width=5)
    keys = both.layers[0].keys
    assert keys.shape == (3, 3, 5, 4)
    assert torch.equal(keys[:2], a.layers[0].keys)
    assert torch.equal(keys[2:, :, :2], torch.zeros(1, 3, 2, 4)) and torch.equal(keys[2:, :, 2:], b.layers[0].keys)
    ptr = keys.data_ptr()
    both.update(*kv(b=3, seed=3), layer_idx=0)
    assert both.layers[0].keys.data_ptr() == ptr  # the stacked buffer had room for the next column


def test_selecting_rows_copies_them_with_room():
    cache = room_cache()
    cache.update(*kv(b=4, n=6, seed=7), layer_idx=0)
    idx = torch.tensor([0, 2, 3])
    kept = select_rows(cache, idx, start=2)
    assert torch.equal(kept.layers[0].keys, cache.layers[0].keys[idx, :, 2:])
    assert torch.equal(kept.layers[0].values, cache.layers[0].values[idx, :, 2:])
    ptr = kept.layers[0].keys.data_ptr()
    kept.update(*kv(b=3, seed=8), layer_idx=0)
    assert kept.layers[0].keys.data_ptr() == ptr
