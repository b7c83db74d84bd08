"""kvcache: the mixed forward (a prefill chunk sharing one pass with a decode step) against the separate cached
forwards and against full recompute; the weights key.

    .venv/bin/pytest tests/test_kvcache.py -q
"""

import pytest
import torch
from conftest import randomize_weights

from chatsmith.kvcache import forward_fused, forward_mixed, weights_key
from chatsmith.model import GPT, ModelConfig


@pytest.fixture(scope="module")
def model() -> GPT:
    cfg = ModelConfig(depth=2, n_embd=64, head_dim=16, n_head=4, n_kv_head=2, seq_len=128).resolve(300)
    model = GPT.build(cfg)
    return randomize_weights(model)


@pytest.mark.parametrize("decode_slots", [[0, 1, 2], [2, 0], [1]])  # contiguous or scattered, one length or many
def test_mixed_forward_equals_separate_forwards_and_full_recompute(model, decode_slots):
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (12, 12, 30, 50)]
    done = {0: 11, 1: 11 if decode_slots != [2, 0] else 7, 2: 29, 3: 20}  # tokens in the cache before the call
    caches = [model.new_kv_cache(slots=4, max_len=64) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            for slot, ids in enumerate(seqs):
                forward_fused(model, torch.tensor([ids[:done[slot]]]), cache, [slot], True)
        decode = torch.tensor([[seqs[s][done[s]]] for s in decode_slots])  # (B, 1)
        chunk = torch.tensor([seqs[3][20:36]])  # 16 prompt tokens continuing slot 3
        got_decode, got_chunk = forward_mixed(model, caches[0], [(decode, decode_slots, False), (chunk, [3], True)])
        ref_decode = forward_fused(model, decode, caches[1], decode_slots, False)
        ref_chunk = forward_fused(model, chunk, caches[1], [3], True)
        assert got_decode.shape == ref_decode.shape == (len(decode_slots), 1, 300)
        assert got_chunk.shape == ref_chunk.shape == (1, 1, 300)
        # equal up to rounding: the matmuls run with other row counts (logits here are ~10 in size)
        assert (got_decode - ref_decode).abs().max().item() <= 1e-4
        assert (got_chunk - ref_chunk).abs().max().item() <= 1e-4
        assert caches[0].lengths == caches[1].lengths
        assert caches[0].lengths[3] == 36 and all(caches[0].lengths[s] == done[s] + 1 for s in decode_slots)
        for slot in range(4):  # the same keys and values were stored
            n = caches[0].lengths[slot]
            assert (caches[0].kv[:, slot, :, :, :n] - caches[1].kv[:, slot, :, :, :n]).abs().max().item() <= 1e-4
        for row, s in enumerate(decode_slots):  # and they are the full forward's
            full = model(torch.tensor([seqs[s][:done[s] + 1]]))[0, -1]
            assert (got_decode[row, -1] - full).abs().max().item() <= 1e-4
        assert (got_chunk[0, -1] - model(torch.tensor([seqs[3][:36]]))[0, -1]).abs().max().item() <= 1e-4


def test_weights_key_follows_in_place_updates_and_moves(model):
    before = weights_key(model)
    assert weights_key(model) == before
    p = model.blocks[0].mlp.up_proj.weight
    with torch.no_grad():
        p.add_(0.0)  # bumps the version counter though no value changes: a conservative key
    assert weights_key(model) != before
    old = p.data
    p.data = old.clone()  # new storage
    try:
        assert weights_key(model) != before
    finally:
        p.data = old
