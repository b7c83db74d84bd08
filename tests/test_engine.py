"""Engine: KV-cached logits and greedy tokens against full recompute, continuous batching (joins, cancels, slot reuse)
against decoding alone, seeded sampling independent of the batch, penalised greedy decoding against full recompute,
stop strings split across tokens and UTF-8-safe streaming with a scripted model, thread use. The sampling functions
themselves (logits processors, sampler, stop strings alone) are tested in test_sampling.py.

    .venv/bin/pytest tests/test_engine.py -q
"""

import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_weights
from test_sampling import penalize_reference

from chatsmith.common import UserError
from chatsmith.engine import Engine
from chatsmith.model import GPT, KVCache, ModelConfig
from chatsmith.sampling import SamplingParams
from chatsmith.tokenizer import Tokenizer

EN = "The quick brown fox jumps over the lazy dog. Numbers like 1998 come one digit at a time.\n"
ZH = "我们今天学习语言模型，它会预测下一个词语。人民日报发表新年讲话。\n"
EMOJI = "🎉 party 👩‍👩‍👧 family 😀 ok\n"
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: with 2 intra-op threads on 2 busy cores each small op waits for the other thread, which a
    training run sharing the machine keeps busy (one thread is many times faster there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [EN * 3, ZH * 3, EMOJI * 3, EN + ZH + EMOJI] * 20
    return Tokenizer.train(texts, 300, show_progress=False)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    cfg = ModelConfig(depth=2, n_embd=64, head_dim=16, n_head=4, n_kv_head=2, seq_len=256).resolve(tok.vocab_size)
    model = GPT.build(cfg)
    return randomize_weights(model)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[0] + torch.randint(16, 300, (3 + 5 * i,), generator=gen).tolist() for i in range(n)]


def greedy_reference(model: GPT, prompt: list[int], n: int, penalties: dict | None = None) -> list[int]:
    """Full recompute every token: argmax of model(all ids so far), optionally with the penalty formula."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            if penalties:
                logits = penalize_reference(logits[None], [ids], [out], **penalties)[0]
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


def run(engine: Engine, requests) -> None:
    while not all(r.done for r in requests):
        engine.step()


# ---------------------------------------------------------------------------------------------------------------------
# the KV cache against full recompute


@pytest.mark.parametrize("fused", [True, False])  # the inference path and the training modules (reference)
def test_cached_logits_match_full_forward(model, fused):
    torch.manual_seed(1)
    seqs = [torch.randint(0, 300, (n,)).tolist() for n in (9, 23, 16, 40)]
    cache = model.new_kv_cache(slots=4, max_len=64)
    with torch.no_grad():
        for slot, ids in enumerate(seqs):  # prefill all but the last 6 tokens; check every prefill position
            ref = model(torch.tensor([ids]))[0]
            got = model.forward_cached(torch.tensor([ids[:-6]]), cache, [slot], fused=fused)[0]
            assert (got - ref[:-6]).abs().max().item() <= 1e-4
        assert cache.lengths == [len(s) - 6 for s in seqs]
        for t in range(6):  # decode steps over slots of different lengths: a contiguous run, or gathered in any order
            for group in ([0, 1, 2, 3],) if t % 2 == 0 else ([3, 0, 2], [1]):
                idx = torch.tensor([[seqs[s][cache.lengths[s]]] for s in group])  # (B, 1)
                got = model.forward_cached(idx, cache, group, fused=fused)[:, -1]  # (B, vocab)
                for row, s in enumerate(group):
                    ref = model(torch.tensor([seqs[s][:cache.lengths[s]]]))[0, -1]
                    assert (got[row] - ref).abs().max().item() <= 1e-4
                if len(group) > 1:
                    assert (got[0] - got[1]).abs().max().item() > 1e-2  # rows are not all alike
        assert cache.lengths == [len(s) for s in seqs]


def test_bf16_cache_under_autocast_stays_close(model):
    idx = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    cache = model.new_kv_cache(slots=2, max_len=64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(idx)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = [model.forward_cached(idx[:, :20], cache, [1])[0]]
            got += [model.forward_cached(idx[:, t:t + 1], cache, [1])[0] for t in range(20, 30)]
    got = torch.cat(got)  # (30, vocab)
    assert got.dtype == torch.float32 and cache.k.dtype == torch.bfloat16
    assert (got - ref).abs().max() / ref.abs().max() < 0.05  # bf16 rounding, not a wrong position or mask
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_greedy_with_cache_equals_full_recompute(model, tok):
    prompt = prompts(1)[0] + [17, 99, 140]
    engine = Engine(model, tok, slots=2)
    result = engine.generate(prompt, SamplingParams(max_tokens=64, **GREEDY))
    ref = greedy_reference(model, prompt, 64)
    assert result.token_ids == ref and result.finish_reason == "length"
    assert len(set(ref)) > 8  # the random model does not just repeat one token
    assert result.text == tok.decode(ref)


def test_cache_too_long_for_rope_and_prompt_too_long(model, tok):
    with pytest.raises(UserError, match="RoPE"):
        model.new_kv_cache(slots=1, max_len=model.rope_len + 1)
    engine = Engine(model, tok, slots=1, max_len=32)
    with pytest.raises(UserError, match="shorten"):
        engine.submit(list(range(20, 52)), SamplingParams())
    with pytest.raises(UserError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.submit([5, 300], SamplingParams())
    result = engine.generate(list(range(20, 50)), SamplingParams(max_tokens=10, **GREEDY))
    assert result.finish_reason == "length" and len(result.token_ids) == 2  # prompt + output fill the 32 slots
    assert result.token_ids == greedy_reference(model, list(range(20, 50)), 2)


def test_fused_weights_follow_in_place_updates(model):
    """The fused path's weight copies are rebuilt when a parameter changes in place (an optimizer step)."""
    ids = torch.tensor([[0, 20, 40, 60, 80]])
    cache = model.new_kv_cache(slots=1, max_len=16)
    before = model.forward_cached(ids, cache, [0])
    with torch.no_grad():
        model.blocks[1].mlp.down_proj.weight.mul_(-1.0)
        try:
            cache.reset(0)
            after = model.forward_cached(ids, cache, [0])
            assert (after - model(ids)).abs().max().item() <= 1e-4 and (after - before).abs().max().item() > 1e-2
        finally:
            model.blocks[1].mlp.down_proj.weight.mul_(-1.0)


@pytest.mark.parametrize("fused", [True, False])  # chunks ride along with the decode step / separate forwards
def test_chunked_prefill_keeps_streams_flowing_and_tokens_exact(model, tok, monkeypatch, fused):
    """A 90-token prompt joining a decoding stream is fed 16 tokens per step (the stream gets a token every step),
    and both give the tokens of full recompute; with nothing decoding a prompt is prefilled in one forward. On the
    fused path each chunk shares one forward with the decode step (kvcache.forward_mixed)."""
    import chatsmith.engine as engine_module

    calls = []
    forward, mixed = model.forward_cached, engine_module.forward_mixed

    def recording(idx, cache, slots, **kwargs):
        calls.append((tuple(slots), idx.size(1)))
        return forward(idx, cache, slots, **kwargs)

    def recording_mixed(model, cache, parts):
        assert [tuple(slots) for _, slots, _ in parts] == [(0,), (1,)]  # the decode rows, then the chunk
        calls.append(((1,), parts[1][0].size(1)))
        mixed_calls.append(parts[1][0].size(1))
        return mixed(model, cache, parts)

    mixed_calls = []

    monkeypatch.setattr(model, "forward_cached", recording)
    monkeypatch.setattr(engine_module, "forward_mixed", recording_mixed)
    engine = Engine(model, tok, slots=2, prefill_chunk=16, fused=fused)
    running = engine.submit(prompts(1)[0], SamplingParams(max_tokens=20, **GREEDY))
    engine.step()
    long_prompt = torch.randint(16, 300, (90,), generator=torch.Generator().manual_seed(8)).tolist()
    joiner = engine.submit(long_prompt, SamplingParams(max_tokens=6, **GREEDY))
    lengths = []
    while not joiner.token_ids:
        engine.step()
        lengths.append(len(running.token_ids))
    assert [n for slots, n in calls if slots == (1,)] == [16] * 5 + [10]  # 90 tokens in six chunks
    assert mixed_calls == ([16] * 5 + [10] if fused else [])
    assert lengths == list(range(3, 3 + len(lengths))) and len(lengths) == 6  # one token per step meanwhile
    run(engine, [running, joiner])
    monkeypatch.undo()
    assert running.result().token_ids == greedy_reference(model, prompts(1)[0], 20)
    assert joiner.result().token_ids == greedy_reference(model, long_prompt, 6)
    calls.clear()
    monkeypatch.setattr(model, "forward_cached", recording)
    alone = Engine(model, tok, slots=1, prefill_chunk=16, prefix_cache_tokens=0, fused=fused).generate(
        long_prompt, SamplingParams(max_tokens=2, **GREEDY))
    assert calls[0][1] == 90 and alone.token_ids == joiner.token_ids[:2]


@pytest.mark.parametrize("fused", [True, False])
def test_auto_chunk_budget_follows_the_measured_step_times(model, tok, fused):
    """The chunk adds CHUNK_SHARE of a decode step: on the fused path by what a prompt token adds to a decode step
    it rides along with, on the reference path by what a prompt token costs in a separate prefill."""
    from chatsmith.engine import CHUNK_SHARE

    engine = Engine(model, tok, slots=2, fused=fused)
    assert engine._chunk_budget() == 16  # nothing measured yet: the smallest chunk
    measured = "_chunk_token_s" if fused else "_prefill_token_s"
    engine._decode_s, engine._last_chunk = 0.004, 16
    setattr(engine, measured, 0.00005)  # a decode step costs as much as 80 prompt tokens
    assert engine._chunk_budget() == 32  # at most twice the chunk before
    engine._last_chunk = 32
    assert engine._chunk_budget() == int(CHUNK_SHARE * 80) == 60
    setattr(engine, measured, 0.001)
    assert engine._chunk_budget() == 16
    assert Engine(model, tok, slots=2, prefill_chunk=7)._chunk_budget() == 7


# ---------------------------------------------------------------------------------------------------------------------
# continuous batching


@pytest.mark.parametrize("slots", [8, 3])
def test_batched_greedy_equals_alone(model, tok, slots):
    ps = prompts(8)
    n_tokens = [20 + 3 * i for i in range(8)]  # different lengths finish at different steps
    engine = Engine(model, tok, slots=slots)
    requests = [engine.submit(p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in zip(ps, n_tokens)]
    run(engine, requests)
    for p, n, r in zip(ps, n_tokens, requests):
        assert r.result().token_ids == greedy_reference(model, p, n)
    assert engine.num_free_slots == slots and engine.num_live == 0 and engine.cache.lengths == [0] * slots


def test_cancel_frees_slot_and_join_mid_decode(model, tok):
    ps = prompts(5, seed=3)
    engine = Engine(model, tok, slots=3)
    params = SamplingParams(max_tokens=30, **GREEDY)
    a, b, c = (engine.submit(p, params) for p in ps[:3])
    for _ in range(5):
        engine.step()
    assert engine.num_free_slots == 0 and len(b.token_ids) == 6  # prefill + 5 decode steps
    b.cancel()
    late = engine.submit(ps[3], params)  # waits: no free slot until the cancel is processed
    events = engine.step()
    assert b.done and b.finish_reason == "cancelled" and len(b.token_ids) == 6
    assert engine.num_waiting == 0 and engine.num_free_slots == 0  # took b's slot at once (its 19-token prompt is
    # prefilled in chunks while the others decode: its first token comes in this step or the next)
    assert any(e.request_id == late.id for e in events + engine.step())
    for _ in range(3):
        engine.step()
    later = engine.submit(ps[4], SamplingParams(max_tokens=12, **GREEDY))  # queued behind three live ones
    run(engine, [a, c, late, later])
    for p, r in zip([ps[0], ps[2], ps[3], ps[4]], [a, c, late, later]):
        assert r.result().token_ids == greedy_reference(model, p, len(r.token_ids))
    assert [len(r.token_ids) for r in (a, c, late, later)] == [30, 30, 30, 12]
    assert engine.num_free_slots == 3
    b.cancel()  # cancelling a finished request changes nothing
    assert engine.step() == [] and b.finish_reason == "cancelled"


def test_cancel_waiting_request(model, tok):
    engine = Engine(model, tok, slots=1)
    first = engine.submit([0, 20, 21], SamplingParams(max_tokens=3, **GREEDY))
    waiting = engine.submit([0, 22, 23], SamplingParams(max_tokens=3, **GREEDY))
    waiting.cancel()
    run(engine, [first, waiting])
    assert waiting.token_ids == [] and waiting.finish_reason == "cancelled" and first.finish_reason == "length"


def test_served_from_another_thread(model, tok):
    engine = Engine(model, tok, slots=2)
    stop = threading.Event()
    thread = threading.Thread(target=engine.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        ps = prompts(3, seed=5)
        requests = [engine.submit(p, SamplingParams(max_tokens=10, **GREEDY)) for p in ps]
        for p, r in zip(ps, requests):
            events = list(r.events(timeout=30))
            assert [t for e in events for t in e.token_ids] == greedy_reference(model, p, 10)
            assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


# ---------------------------------------------------------------------------------------------------------------------
# sampling


def test_seeded_sampling_does_not_depend_on_the_batch(model, tok):
    params = SamplingParams(max_tokens=30, temperature=1.0, top_k=40, top_p=0.95, seed=7, ignore_eos=True)
    prompt = prompts(2, seed=9)[1]
    alone = Engine(model, tok, slots=4).generate(prompt, params)
    engine = Engine(model, tok, slots=4)
    others = [engine.submit(p, q) for p, q in zip(prompts(3, seed=11), [
        SamplingParams(max_tokens=25, **GREEDY),
        SamplingParams(max_tokens=40, temperature=0.8, seed=3, presence_penalty=0.5, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=1.2, min_p=0.05, ignore_eos=True)])]
    engine.step()
    engine.step()
    mine = engine.submit(prompt, params)  # joins two steps later, beside rows at other lengths
    run(engine, [mine, *others])
    assert mine.result().token_ids == alone.token_ids and mine.text == alone.text
    assert alone.token_ids != greedy_reference(model, prompt, 30)
    other_seed = Engine(model, tok, slots=1).generate(prompt, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert other_seed.token_ids != alone.token_ids


def test_greedy_with_penalties_equals_reference(model, tok):
    prompt = prompts(3, seed=4)[2]
    penalties = dict(presence=0.5, frequency=0.3, repetition=1.3)
    params = SamplingParams(max_tokens=40, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.3,
                            **GREEDY)
    engine = Engine(model, tok, slots=2)
    plain = engine.submit(prompt, SamplingParams(max_tokens=40, **GREEDY))  # batched beside an unpenalised row
    penal = engine.submit(prompt, params)
    run(engine, [plain, penal])
    assert penal.result().token_ids == greedy_reference(model, prompt, 40, penalties)
    assert penal.token_ids != plain.token_ids


# ---------------------------------------------------------------------------------------------------------------------
# stops and streaming, with a scripted model that emits a fixed token sequence per prompt


class ScriptedModel(torch.nn.Module):
    """The engine's model interface with one-hot logits: after prompt P it emits scripts[P], then <|im_end|>."""

    def __init__(self, vocab_size: int, scripts: dict[tuple, list[int]], seq_len: int = 256):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, seq_len=seq_len)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.scripts, self.prompt_of = scripts, {}  # a prompt without a script raises KeyError

    def new_kv_cache(self, slots, max_len=None, dtype=None):
        return KVCache(1, slots, 1, max_len or self.config.seq_len, 2)

    def forward_cached(self, idx, cache, slots, last_only=False):
        logits = torch.zeros(idx.size(0), 1, self.config.vocab_size)
        for row, slot in enumerate(slots):
            if cache.lengths[slot] == 0:
                self.prompt_of[slot] = tuple(idx[row].tolist())
            cache.lengths[slot] += idx.size(1)
            script = self.scripts[self.prompt_of[slot]]
            n = cache.lengths[slot] - len(self.prompt_of[slot])  # tokens generated and fed back so far
            logits[row, 0, script[n] if n < len(script) else 2] = 100.0
        return logits


def scripted(tok: Tokenizer, text: str, prompt=(0, 1)):
    ids = tok.encode(text)
    return ScriptedModel(tok.vocab_size, {tuple(prompt): ids}), ids


def stream(engine: Engine, prompt, params: SamplingParams):
    request = engine.submit(list(prompt), params)
    run(engine, [request])
    events = list(request.events(timeout=1))
    result = request.result()
    assert "".join(e.text for e in events) == result.text  # the deltas are exactly the final text
    assert [t for e in events for t in e.token_ids] == result.token_ids
    return events, result


@pytest.mark.parametrize("text, stop, include, expected", [
    ("Hello 你好 world🎉END and more", ("END",), False, "Hello 你好 world🎉"),
    ("abc 你好 def", ("你好",), False, "abc "),
    ("a STx b STOP c", ("STOP",), False, "a STx b "),
    ("one 😀 two 😀 three", ("two 😀", "three"), True, "one 😀 two 😀"),
    ("xyz wins?", ("yz wins", "z w"), False, "xy"),  # the stop string that ends first wins
    ("quick fox jumps", ("fox", "quick brown"), False, "quick "),  # a partial match of another stop string is released
])
def test_stop_strings_split_across_tokens(tok, text, stop, include, expected):
    model, ids = scripted(tok, text)
    assert not any(s.encode() in tok.id_bytes(t) for s in stop for t in ids)  # every stop string spans tokens
    engine = Engine(model, tok, slots=2)
    events, result = stream(engine, (0, 1), SamplingParams(max_tokens=100, temperature=0, stop=stop,
                                                           include_stop_str_in_output=include))
    assert result.text == expected and result.finish_reason == "stop" and result.stop_reason in stop
    assert "\ufffd" not in result.text
    assert len(result.token_ids) < len(ids)  # it stopped early
    assert engine.num_free_slots == 2


def test_text_is_held_back_only_while_it_could_start_a_stop_string(tok):
    text = "a STx b STOP c"
    model, ids = scripted(tok, text)
    events, result = stream(Engine(model, tok), (0, 1), SamplingParams(temperature=0, stop=["STOP"]))
    emitted = ""
    for i, event in enumerate(events):
        emitted += event.text
        so_far = tok.decode(ids[:i + 1])
        if so_far.endswith(("S", "ST", "STO")) and event.finish_reason is None:
            assert emitted == so_far[:so_far.rindex("S")]  # the candidate stop prefix is held back
        elif event.finish_reason is None:
            assert emitted == so_far  # everything else goes out at once
    assert result.text == "a STx b "


@pytest.mark.parametrize("text", [EMOJI + ZH, "混合 text 🎉👩‍👩‍👧 end", ZH])
def test_streamed_unicode_equals_full_decode(tok, text):
    model, ids = scripted(tok, text)
    assert len(ids) > len(text)  # multi-byte characters really are split over tokens
    events, result = stream(Engine(model, tok), (0, 1), SamplingParams(max_tokens=500, temperature=0))
    assert result.text == text and result.finish_reason == "stop" and result.stop_reason == 2  # <|im_end|>
    assert result.token_ids == ids + [2]
    assert all("\ufffd" not in e.text for e in events)
    assert sum(1 for e in events if e.text == "") > 0  # some tokens completed no character


def test_length_cut_inside_a_character_and_inside_a_stop_prefix(tok):
    text = "ok 🎉 ENDING"
    model, ids = scripted(tok, text)
    cut = next(i for i in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:i]))  # inside the emoji's bytes
    events, result = stream(Engine(model, tok), (0, 1), SamplingParams(max_tokens=cut, temperature=0))
    assert result.finish_reason == "length" and result.text == tok.decode(ids[:cut])  # ends in U+FFFD as decode
    n_en = next(i for i in range(1, len(ids) + 1) if tok.decode(ids[:i]).endswith("EN"))
    events, result = stream(Engine(model, tok), (0, 1), SamplingParams(max_tokens=n_en, temperature=0,
                                                                       stop=("END!",)))
    assert result.finish_reason == "length" and result.text == "ok 🎉 EN"  # the held-back "EN" comes out at the end
    assert events[-1].text.endswith("EN")


def test_stop_token_ids_and_ignore_eos(tok):
    model, ids = scripted(tok, "abcdef")
    result = Engine(model, tok).generate([0, 1], SamplingParams(temperature=0, stop_token_ids=(ids[3],)))
    assert result.token_ids == ids[:4] and result.text == tok.decode(ids[:3]) and result.stop_reason == ids[3]
    result = Engine(model, tok).generate([0, 1], SamplingParams(temperature=0, max_tokens=len(ids) + 2,
                                                                ignore_eos=True))
    assert result.finish_reason == "length" and result.text == "abcdef" + "<|im_end|>" * 2
