"""The running batch's KV cache (server.kvcache): appends in place, never into a view handed out."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("done", [0, 5, 40])
def test_a_split_piece_attention_equals_the_masked_softmax(dtype, done, monkeypatch):
    """A piece's queries at positions done … done+n-1, GQA (6 query heads on 2 KV heads): the two
    flash calls merged by their log-sum-exps give the causal softmax over all earlier keys, as the
    one masked call does — within the rounding of the dtype (bf16 keeps 8 bits: ~0.4% of a value
    of magnitude 1, here below 2e-2 absolute on outputs that are averages of unit-normal values)."""
    from server import kvcache

    n, hq, hkv, d = 33, 6, 2, 16
    g = torch.Generator().manual_seed(done)
    q = torch.randn(1, hq, n, d, generator=g)
    k, v = torch.randn(1, hkv, done + n, d, generator=g), torch.randn(1, hkv, done + n, d, generator=g)
    # reference in fp64: each query head h attends with KV head h // 3, query i sees keys ≤ done + i
    kk, vv = k.double().repeat_interleave(hq // hkv, 1), v.double().repeat_interleave(hq // hkv, 1)
    scores = q.double() @ kk.transpose(-1, -2) / d**0.5  # (1, Hq, n, done+n)
    visible = torch.arange(done + n)[None, :] <= torch.arange(done, done + n)[:, None]
    want = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vv
    cache = kvcache.MixedCache(None, DynamicCache(), 0, None, done, n, torch.device("cpu"))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    outs = {}
    for split_at in (n + 1, 2):  # one masked call; the split (its threshold lowered to this piece)
        monkeypatch.setattr(kvcache, "SPLIT_MIN_QUERIES", split_at)
        outs[split_at] = kvcache._piece_attention(q.to(dtype), k.to(dtype), v.to(dtype), cache, d**-0.5)
        assert outs[split_at].shape == (1, hq, n, d) and outs[split_at].dtype == dtype
        assert (outs[split_at].double() - want).abs().max() < tol
