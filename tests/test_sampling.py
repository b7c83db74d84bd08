"""Sampling: the logits processors (top-k, top-p, min-p; repetition, frequency and presence penalties) against brute
force by their definitions, the inverse-CDF sampler's frequencies, SamplingParams' range checks as UserErrors, and
stop strings fed in any split equal to the whole text. Pure functions, no model (the engine's use of them is in
test_engine.py).

    .venv/bin/pytest tests/test_sampling.py -q
"""

import math

import pytest
import torch

from chatsmith.common import UserError
from chatsmith.sampling import SamplingParams, StopStrings, apply_penalties, filter_logits, sample_tokens


def penalize_reference(logits, seen_ids, out_ids, presence, frequency, repetition):
    """The penalty formula written out token by token (tokens never seen keep their logit)."""
    res = logits.clone()
    for b in range(logits.size(0)):
        for v in set(seen_ids[b]) | set(out_ids[b]):
            x = logits[b, v].item()
            x = x / repetition if x > 0 else x * repetition
            count = out_ids[b].count(v)
            res[b, v] = x - frequency * count - presence * (count > 0)
    return res


def filter_reference(row: list[float], k: int, p: float, min_p: float) -> set[int]:
    """Kept token ids by the definitions, with Python lists."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if k:
        order = order[:k]
    z = [math.exp(row[i] - row[order[0]]) for i in order]
    probs = [x / sum(z) for x in z]
    kept, mass = [], 0.0
    for i, q in zip(order, probs):
        if p < 1 and mass >= p:
            break
        kept.append((i, q))
        mass += q
    return {i for i, q in kept if q >= min_p * probs[0]}


def test_filters_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    B, V = 12, 60
    logits = torch.randn(B, V, generator=gen) * 2
    top_k = torch.tensor([0, 1, 5, 20, 0, 0, 7, 0, 60, 3, 0, 10])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.9, 0.5, 0.05, 0.7, 1.0, 0.99, 1.0, 0.3, 0.8])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.0, 0.5, 0.01, 0.05])
    out = filter_logits(logits, top_k, top_p, min_p)
    for b in range(B):
        kept = set(torch.isfinite(out[b]).nonzero().flatten().tolist())
        assert kept == filter_reference(logits[b].tolist(), int(top_k[b]), float(top_p[b]), float(min_p[b])), b
        assert torch.equal(out[b][list(kept)], logits[b][list(kept)])
    assert len({int(torch.isfinite(out[b]).sum()) for b in range(B)}) > 6  # the cases really differ


def test_penalties_match_brute_force():
    gen = torch.Generator().manual_seed(1)
    B, V = 3, 40
    logits = torch.randn(B, V, generator=gen) * 3
    prompt_ids = [[1, 2, 3, 5], [7, 7, 8], []]
    out_ids = [[5, 5, 9, 30, 5], [8, 1], [4, 4, 4, 39]]
    counts = torch.zeros(B, V)
    seen = torch.zeros(B, V, dtype=torch.bool)
    for b in range(B):
        for t in out_ids[b]:
            counts[b, t] += 1
        seen[b, prompt_ids[b] + out_ids[b]] = True
    presence, frequency, repetition = [0.4, -0.5, 1.0], [0.25, 0.0, -1.0], [1.5, 0.7, 1.0]
    got = apply_penalties(logits, counts, seen, torch.tensor(presence)[:, None], torch.tensor(frequency)[:, None],
                          torch.tensor(repetition)[:, None])
    for b in range(B):
        ref = penalize_reference(logits[b:b + 1], [prompt_ids[b] + out_ids[b]], [out_ids[b]], presence[b],
                                 frequency[b], repetition[b])
        assert torch.allclose(got[b], ref[0], atol=1e-6)
    assert (got - logits).abs().max() > 1.0


def test_inverse_cdf_sampler_frequencies():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 1.0, 0.0]])
    n = 1000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # stratified: exact frequencies
    tokens = sample_tokens(probs.log().repeat_interleave(n, 0), uniforms.repeat(2))
    assert torch.bincount(tokens[:n], minlength=4).tolist() == [500, 0, 300, 200]
    assert torch.bincount(tokens[n:], minlength=4).tolist() == [0, 0, 1000, 0]
    edge = sample_tokens(probs.log(), torch.tensor([1 - 2**-53, 0.0], dtype=torch.float64))
    assert edge.tolist() == [3, 2]


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(min_p=2), "min_p"), (dict(stop=("",)), "stop"), (dict(presence_penalty=3), "presence"),
    (dict(repetition_penalty=0), "repetition"), (dict(top_k=-1), "top_k"),
])
def test_bad_sampling_params_are_user_errors(kwargs, words):
    with pytest.raises(UserError, match=words):
        SamplingParams(**kwargs)
    assert SamplingParams(stop="END").stop == ("END",)


# ---------------------------------------------------------------------------------------------------------------------
# stop strings on streamed text


def test_stop_strings_char_by_char_equals_one_piece():
    """Feeding the text in any split gives the same final text and stop as feeding it whole."""
    text = "say STOP? no, STOPPED. END"
    stops = ("D. E", "?!", "STOPP")  # listed first is not what ends first
    whole = StopStrings(stops)
    whole_out = whole.push(text) + whole.flush()
    for size in (1, 2, 3, 5):
        s, out = StopStrings(stops), ""
        for i in range(0, len(text), size):
            out += s.push(text[i:i + size])
            if s.matched:
                break
        out += s.flush()
        assert (out, s.matched) == (whole_out, whole.matched) == ("say STOP? no, ", "STOPP")
