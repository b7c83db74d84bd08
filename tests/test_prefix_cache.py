"""Prefix cache: restored keys/values are exactly the stored ones, a lookup matches only whole equal prefixes, memory
stays bounded with LRU leaf-first eviction (checked against a brute-force model of the policy), and through the
engine: logits and greedy tokens with the cache equal those without it, a multi-turn chat prefills only the new
turn, and new weights clear the cache.

    .venv/bin/pytest tests/test_prefix_cache.py -q
"""

import random

import pytest
import torch

from chatsmith.bench import bench_tokenizer
from chatsmith.engine import Engine
from chatsmith.kvcache import KVCache
from chatsmith.model import GPT, ModelConfig
from chatsmith.prefix_cache import PrefixCache
from chatsmith.sampling import SamplingParams
from chatsmith.tokenizer import Tokenizer

BS = 4  # block size in the unit tests
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def filled_cache(slots: int = 3, max_len: int = 40) -> KVCache:
    cache = KVCache(2, slots, 2, max_len, 3)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=torch.Generator().manual_seed(0)))
    return cache


def kv_of(cache: KVCache, slot: int, n: int) -> torch.Tensor:
    return cache.kv[:, slot, :, :, :n].clone()  # (L, 2, K, n, D)


# ---------------------------------------------------------------------------------------------------------------------
# the block store


def test_load_restores_exactly_the_stored_blocks_and_leaves_a_token():
    cache = filled_cache()
    prefix = PrefixCache(cache, max_tokens=64, block_size=BS)
    ids = list(range(100, 114))  # 14 tokens: 3 full blocks
    cache.lengths[0] = 14
    stored = kv_of(cache, 0, 12)
    prefix.store(ids, 0)
    assert len(prefix) == 3
    cache.kv[:, 1].zero_()
    assert prefix.load(ids + [7, 8], 1) == 12 and cache.lengths[1] == 12
    assert torch.equal(kv_of(cache, 1, 12), stored)  # bit for bit
    assert prefix.load(ids[:12], 2) == 8  # a fully cached prompt still prefills its last block's tokens
    assert prefix.load(ids[:4], 2) == 0 and prefix.load(ids[:5], 2) == 4


def test_a_different_earlier_token_blocks_every_later_match():
    cache = filled_cache()
    prefix = PrefixCache(cache, max_tokens=64, block_size=BS)
    ids = list(range(100, 113))
    cache.lengths[0] = 13
    prefix.store(ids, 0)
    for changed in (0, 3, 5, 11):
        other = list(ids)
        other[changed] = 999
        assert prefix.load(other, 1) == BS * (changed // BS)  # blocks before the change only
    assert prefix.load([5] + ids, 1) == 0  # shifted by one: nothing matches (blocks sit at fixed positions)


def test_store_only_what_the_slot_holds_and_nothing_twice():
    cache = filled_cache()
    prefix = PrefixCache(cache, max_tokens=64, block_size=BS)
    cache.lengths[0] = 6
    prefix.store(list(range(20)), 0)  # ids longer than the slot: only its one full block counts
    assert len(prefix) == 1
    cache.lengths[0] = 20
    prefix.store(list(range(20)), 0)
    prefix.store(list(range(20)), 0)
    assert len(prefix) == 5


def brute_force_lru(ops, capacity: int):
    """The policy written plainly: a list of prefixes (tuples of whole blocks) in recency order; a store inserts or
    touches each prefix of the sequence, a load touches the longest cached one and its ancestors; when full, the
    least recent prefix that is no other cached prefix's parent is dropped."""
    order: list[tuple] = []  # least recent first

    def touch(chain):
        for p in reversed(chain):  # leaf first, so the root ends up most recent
            if p in order:
                order.remove(p)
            order.append(p)

    hits = []
    for op, ids in ops:
        blocks = [tuple(ids[j * BS:(j + 1) * BS]) for j in range(len(ids) // BS)]
        if op == "store":
            chain = []
            for j in range(len(blocks)):
                p = tuple(blocks[:j + 1])
                if p not in order:
                    if len(order) == capacity:
                        parents = {q[:-1] for q in order} | set(chain)
                        victim = next(q for q in order if q not in parents)
                        order.remove(victim)
                    order.append(p)  # placed; its final position comes from touch
                chain.append(p)
            touch(chain)
        else:
            n = (len(ids) - 1) // BS
            chain = []
            for j in range(n):
                p = tuple(blocks[:j + 1])
                if p not in order:
                    break
                chain.append(p)
            touch(chain)
            hits.append(len(chain) * BS)
    return hits, order


def test_eviction_matches_brute_force_lru_leaves_first():
    rng = random.Random(0)
    capacity = 7
    cache = filled_cache(slots=1, max_len=32)
    prefix = PrefixCache(cache, max_tokens=capacity * BS, block_size=BS)
    stems = [[rng.randrange(3) for _ in range(8)] for _ in range(3)]  # shared beginnings, so chains branch
    ops, snapshots = [], {}
    for _ in range(200):
        ids = rng.choice(stems)[:rng.choice([4, 8])] + [rng.randrange(3) for _ in range(rng.randrange(0, 14))]
        ops.append(("store" if rng.random() < 0.5 else "load", ids))
    hits = []
    for op, ids in ops:
        if op == "store":
            cache.lengths[0] = len(ids)
            cache.kv.copy_(torch.randn(cache.kv.shape))
            prefix.store(ids, 0)
            for j in range(len(ids) // BS):  # what each newly cached block (named by its prefix) must restore to
                snapshots.setdefault(tuple(ids[:(j + 1) * BS]), kv_of(cache, 0, (j + 1) * BS)[:, :, :, j * BS:])
        else:
            n = prefix.load(ids, 0)
            hits.append(n)
            for j in range(n // BS):  # each restored block holds what was stored when it was first cached
                block = kv_of(cache, 0, n)[:, :, :, j * BS:(j + 1) * BS]
                assert torch.equal(block, snapshots[tuple(ids[:(j + 1) * BS])])
        assert len(prefix) <= capacity
        # every cached block's parent is cached: nothing unreachable holds memory
        assert all(b.parent is None or b.parent in prefix._blocks for b in prefix._blocks.values())
        for key in list(snapshots):  # forget the snapshots of evicted prefixes (a new store may differ)
            if not _cached(prefix, key):
                del snapshots[key]
    ref_hits, ref_order = brute_force_lru(ops, capacity)
    assert hits == ref_hits
    assert sum(hits) > 0 and len(prefix) == capacity  # the test exercised hits and a full cache
    assert len(ref_order) == len(prefix)


def _cached(prefix: PrefixCache, ids: tuple) -> bool:
    parent = -1
    for j in range(len(ids) // BS):
        block = prefix._blocks.get((parent, tuple(ids[j * BS:(j + 1) * BS])))
        if block is None:
            return False
        parent = block.uid
    return True


def test_zero_capacity_caches_nothing():
    cache = filled_cache()
    prefix = PrefixCache(cache, max_tokens=BS - 1, block_size=BS)
    cache.lengths[0] = 12
    prefix.store(list(range(12)), 0)
    assert len(prefix) == 0 and prefix.load(list(range(12)), 1) == 0


# ---------------------------------------------------------------------------------------------------------------------
# through the engine


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return bench_tokenizer(400)  # specials, bytes, byte pairs: no training (this test is about the cache)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    cfg = ModelConfig(depth=2, n_embd=64, head_dim=16, n_head=4, n_kv_head=2, seq_len=256).resolve(tok.vocab_size)
    model = GPT.build(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if p.dim() == 1 else torch.randn(p.shape, generator=gen))
    return model.eval()


def test_logits_with_a_restored_prefix_equal_a_full_forward(model):
    ids = torch.randint(16, 400, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    cache = model.new_kv_cache(slots=2, max_len=128)
    prefix = PrefixCache(cache, max_tokens=256)
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]  # (70, vocab)
        model.forward_cached(torch.tensor([ids[:50]]), cache, [0])
        prefix.store(ids[:50], 0)  # 3 blocks of 16
        n = prefix.load(ids, 1)
        assert n == 48
        got = model.forward_cached(torch.tensor([ids[n:]]), cache, [1])[0]  # (22, vocab)
    assert (got - full[n:]).abs().max().item() <= 1e-4  # fp32 tolerance: the blocks came from other matmul shapes
    assert (full[n:] - full[n - 1]).abs().max().item() > 1e-2  # rows differ: positions are not mixed up


def chat_prompts(tok: Tokenizer, engine: Engine, turns: int, n_reply: int) -> tuple[list[list[int]], list]:
    """Serve a conversation turn by turn, the client resending it whole with the replies it got."""
    messages, prompts, results = [], [], []
    for k in range(turns):
        messages.append({"role": "user", "content": f"Question {k}: how are you, fox?"})
        prompts.append(tok.render_for_completion(messages))
        results.append(engine.generate(prompts[-1], SamplingParams(max_tokens=n_reply, **GREEDY)))
        reply = tok.decode(results[-1].token_ids).replace("<|", "").replace("<tool", "")  # no special-token text
        messages.append({"role": "assistant", "content": reply})
    return prompts, results


def test_multi_turn_chat_prefills_only_the_new_turn_and_tokens_match(model, tok, monkeypatch):
    fed = []
    forward = model.forward_cached

    def counting(idx, cache, slots, **kwargs):
        if idx.size(1) > 1:
            fed.append(idx.size(1))
        return forward(idx, cache, slots, **kwargs)

    monkeypatch.setattr(model, "forward_cached", counting)
    cached = Engine(model, tok, slots=2, max_len=1024)
    prompts, with_cache = chat_prompts(tok, cached, turns=4, n_reply=8)
    monkeypatch.undo()
    plain = Engine(model, tok, slots=2, max_len=1024, prefix_cache_tokens=0)
    _, without = chat_prompts(tok, plain, turns=4, n_reply=8)
    assert [r.token_ids for r in with_cache] == [r.token_ids for r in without]
    assert cached.prefix.hit_tokens > 0 and plain.prefix is None
    for k in range(1, 4):  # each later turn prefilled only what the earlier turns had not cached
        assert fed[k] < len(prompts[k]) - len(prompts[k - 1]) + 2 * cached.prefix.block_size
    assert sum(fed) < sum(len(p) for p in prompts) / 2


def test_new_weights_clear_the_cache(model, tok):
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. Hello there!", bos=True)
    engine = Engine(model, tok, slots=1)
    first = engine.generate(prompt, SamplingParams(max_tokens=8, **GREEDY))
    assert len(engine.prefix) > 0
    changed = GPT.build(model.config)
    changed.load_state_dict(model.state_dict())
    changed.eval()
    engine2 = Engine(changed, tok, slots=1)
    engine2.generate(prompt, SamplingParams(max_tokens=8, **GREEDY))
    with torch.no_grad():
        changed.blocks[0].mlp.up_proj.weight.mul_(-1.0)  # in place, as an optimizer step would
    hits = engine2.prefix.hit_tokens
    after = engine2.generate(prompt, SamplingParams(max_tokens=8, **GREEDY))
    assert engine2.prefix.hit_tokens == hits  # a miss: the stale blocks were dropped
    reference = Engine(changed, tok, slots=1, prefix_cache_tokens=0).generate(
        prompt, SamplingParams(max_tokens=8, **GREEDY))
    assert after.token_ids == reference.token_ids != first.token_ids
