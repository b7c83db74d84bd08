"""Tokenizer: exact round trip for any str (hypothesis), specials never forged from text, decode equal to
`tokenizers`' own decode, streaming decode equal to the full decode (and to CPython's UTF-8 decoder on random bytes),
token_bytes against encoded lengths, save/load, and the train stage (fair source mix, skip when current). The eval
stage is in tests/test_tokenizer_eval.py."""

import json
import random

import pytest
import regex
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chatsmith import config
from chatsmith import tokenizer as tkz
from chatsmith.common import UserError
from chatsmith.tokenizer import SPECIAL_TOKENS, Tokenizer

EN = ("The quick brown fox jumps over the lazy dog. A tokenizer turns text into numbers, and the model learns "
      "which number comes next. Numbers like 1998 and 2024 are split into single digits.\n")
ZH = "我们今天学习语言模型，它会预测下一个词语并且不断进步。人民日报发表新年讲话，迈向充满希望的新世纪。\n"
CODE = "def f(x):\n    return x * 2  # double\n\nfor i in range(10):\n    print(f(i))\r\n"
VOCAB = 512

# any str that can be encoded as UTF-8: every code point except the surrogates (category Cs)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
NASTY = ["", "\x00", "\r\n", "\r\n\r\n  \t", "e\u0301\u0302", "🎉👩‍👩‍👧 ok", "世界\u3000１２月", "\x7f\x1b[0m",
         "<|im_end|>", "<|endoftext|>hi<|im_start|>", " <|reserved_5|> ", "\ufeff\ufffd", "  leading", "x\U0010ffff"]


def corpus_texts() -> list[str]:
    rng = random.Random(0)
    pieces = [EN, ZH, CODE]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 4))) for _ in range(300)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus_texts(), VOCAB, show_progress=False)


def hf(tok: Tokenizer):
    return tok._tok


# ---------------------------------------------------------------------------------------------------------------------
# layout, round trip, specials


def test_layout(tok):
    assert tok.vocab_size == VOCAB == hf(tok).get_vocab_size()
    assert tok.bos_id == tok.special_id("<|endoftext|>") == 0
    assert [tok.special_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2]
    assert [tok.special_id(f"<|reserved_{i}|>") for i in range(3, 16)] == list(range(3, 16))
    with pytest.raises(ValueError, match="not a special token"):
        tok.special_id("<|nope|>")
    assert tok.decode([tok.special_id("<|im_start|>")]) == "<|im_start|>"
    # no normalizer, digits one at a time
    assert hf(tok).normalizer is None
    assert len(tok.encode("1234567890")) == 10


@settings(max_examples=300, deadline=None)
@given(TEXT)
@example("".join(NASTY))
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(i >= tkz.N_SPECIAL for i in ids)  # plain text never becomes a special id
    assert tok.token_bytes()[ids].sum().item() == len(text.encode("utf-8"))


@pytest.mark.parametrize("text", NASTY)
def test_round_trip_nasty(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text and all(i >= tkz.N_SPECIAL for i in ids)


def test_literal_special_strings_stay_text(tok):
    for special in tkz.ALL_SPECIALS:
        ids = tok.encode(f"user says {special} here")
        assert tok.special_id(special) not in ids and len(ids) > 3
        assert tok.decode(ids) == f"user says {special} here"
    # the id itself still decodes to the literal, and an intended special is inserted as an id
    im_end = tok.special_id("<|im_end|>")
    ids = tok.encode("hi") + [im_end]
    assert tok.decode(ids) == "hi<|im_end|>" and ids.count(im_end) == 1


def test_bos_and_batch(tok):
    texts = corpus_texts()[:20] + NASTY
    for bos in (False, True):
        batch = tok.encode_batch(texts, bos=bos)
        assert batch == [tok.encode(t, bos=bos) for t in texts]
    for t in texts:
        assert tok.encode(t, bos=True) == [tok.bos_id] + tok.encode(t)
        assert tok.decode(tok.encode(t, bos=True)) == "<|endoftext|>" + t
    assert tok.encode("", bos=True) == [tok.bos_id]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, VOCAB - 1), max_size=60))
def test_decode_equals_tokenizers_decode(tok, ids):
    """Our byte-level decode is `tokenizers`' own ByteLevel decode (from_utf8_lossy == errors='replace')."""
    assert tok.decode(ids) == hf(tok).decode(ids, skip_special_tokens=False)


def test_out_of_vocab_ids_decode_to_nothing(tok):
    assert tok.decode([VOCAB, VOCAB + 100, -1]) == ""
    assert tok.decode(tok.encode("ok") + [VOCAB + 3]) == "ok"
    assert hf(tok).decode([VOCAB + 3]) == ""


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype.is_floating_point is False and tb.shape == (VOCAB,) and str(tb.dtype) == "torch.int64"
    assert tb[: tkz.N_SPECIAL].tolist() == [0] * tkz.N_SPECIAL
    table = tkz.bytes_to_unicode()
    byte_of = {c: b for b, c in table.items()}
    for i in range(tkz.N_SPECIAL, VOCAB):  # reference: the token string through GPT-2's byte map
        assert tb[i].item() == len(bytes(byte_of[c] for c in hf(tok).id_to_token(i))) >= 1
    # the byte map is the one `tokenizers` uses
    from tokenizers import pre_tokenizers

    assert sorted(table.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(set(table.values())) == 256


def test_save_load(tok, tmp_path):
    path = tok.save(tmp_path / "tk")
    assert path == tmp_path / "tk" / "tokenizer.json"
    texts = corpus_texts()[:30] + NASTY
    for loaded in (Tokenizer.load(tmp_path / "tk"), Tokenizer.load(path), Tokenizer.load(str(path))):
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.encode_batch(texts, bos=True) == tok.encode_batch(texts, bos=True)
        assert loaded.encode("<|im_end|>") == tok.encode("<|im_end|>")  # the setting survives a reload
        assert tok.special_id("<|im_end|>") not in loaded.encode("<|im_end|>")
        assert loaded.token_bytes().tolist() == tok.token_bytes().tolist()


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    HF(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="not written by chatsmith"):
        Tokenizer.load(tmp_path)


def test_train_rejects_tiny_vocab():
    with pytest.raises(UserError, match="at least 272"):
        Tokenizer.train(["abc"], 100)


# ---------------------------------------------------------------------------------------------------------------------
# incremental decoder


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = tok.incremental_decoder()
    return [dec.push(i) for i in ids] + [dec.flush()]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, VOCAB + 2), max_size=40))
def test_incremental_random_ids(tok, ids):
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    # what has been emitted after k ids is a prefix of the decode of every longer prefix of ids: nothing emitted is
    # ever revised, in particular no U+FFFD for a character that later bytes complete
    emitted = ""
    for k in range(len(ids)):
        emitted += pieces[k]
        for j in range(k + 1, len(ids) + 1):
            assert tok.decode(ids[:j]).startswith(emitted)


@settings(max_examples=200, deadline=None)
@given(TEXT)
@example("".join(NASTY))
def test_incremental_encoded_text(tok, text):
    pieces = stream(tok, tok.encode(text, bos=True))
    assert "".join(pieces) == "<|endoftext|>" + text
    assert not any("\ufffd" in p for p in pieces) or "\ufffd" in text


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.lists(st.integers(0, 40), max_size=8))
def test_incremental_utf8_matches_cpython(tok, data, cuts):
    """The same decoder on raw byte chunks equals bytes.decode(errors='replace') (the reference)."""
    chunks = [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)])]
    dec = tok.incremental_decoder()
    out = "".join(dec._utf8.decode(c, final=False) for c in chunks) + dec.flush()
    assert out == data.decode("utf-8", errors="replace")


def test_incremental_holds_partial_characters(tok):
    byte_id = {b: i for i in range(tkz.N_SPECIAL, VOCAB) if len(b := tok.id_bytes(i)) == 1}
    assert len(byte_id) == 256
    ids = [byte_id[bytes([b])] for b in "世".encode()]
    dec = tok.incremental_decoder()
    assert [dec.push(i) for i in ids] == ["", "", "世"] and dec.flush() == ""
    # an incomplete character followed by ASCII: one U+FFFD, exactly like the full decode
    ids = [byte_id[b"\xe4"], byte_id[b"\xb8"], byte_id[b"a"]]
    assert [dec.push(i) for i in ids] == ["", "", "\ufffda"] == ["", "", tok.decode(ids)]
    # a dangling lead byte at the end comes out of flush, and the decoder is reusable afterwards
    assert dec.push(byte_id[b"\xf0"]) == "" and dec.flush() == "\ufffd" == tok.decode([byte_id[b"\xf0"]])
    assert dec.push(byte_id[b"z"]) == "z"


# ---------------------------------------------------------------------------------------------------------------------
# train stage


def test_interleave_by_chars():
    streams = {"long": iter(["a" * 100] * 10), "short": iter(["b" * 10] * 100), "tiny": iter(["c" * 5] * 2)}
    got = list(tkz.interleave_by_chars(streams, 600))
    taken = {n: sum(len(t) for m, t in got if m == n) for n in ("long", "short", "tiny")}
    assert taken["tiny"] == 10  # exhausted: its share passed on
    assert abs(taken["long"] - taken["short"]) <= 100 and sum(taken.values()) >= 600
    assert sum(taken.values()) - len(got[-1][1]) < 600  # stops right after crossing the budget
    # brute force: replay the rule "next from the stream with the fewest characters taken so far"
    counts = {"long": 0, "short": 0, "tiny": 0}
    sizes = {"long": [100] * 10, "short": [10] * 100, "tiny": [5] * 2}
    for name, text in got:
        live = [n for n in counts if sizes[n]]
        assert counts[name] == min(counts[n] for n in live)
        counts[name] += len(text)
        sizes[name].pop()


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")


def stage_flags(run, *sources, extra=()):
    return ["--preset", "smoke", "--run", run, "--sources", *[f"local:{s}" for s in sources],
            "--val-fraction", "0.2", *extra]


def test_train_main(chatsmith_home, tmp_path, capsys):
    en, zh = tmp_path / "en.jsonl", tmp_path / "zh.jsonl"
    rng = random.Random(1)
    write_jsonl(en, [f"{i}: " + EN * rng.randint(5, 20) + CODE for i in range(200)])
    write_jsonl(zh, [f"{i}: " + ZH * rng.randint(1, 3) for i in range(200)])
    argv = stage_flags("t", en, zh, extra=("--vocab-size", "400", "--train-chars", "30000"))
    cfg = config.parse(config.TokenizerStage, argv)
    tkz.train_main(cfg)
    out = chatsmith_home / "runs" / "t" / "tokenizer"
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 400
    assert config.from_dict(config.TokenizerStage, json.loads((out / "config.json").read_text())["tokenizer"]) == cfg
    log = capsys.readouterr().err
    # both sources got an equal share even though English documents are ~10x longer
    shares = {k: int(v.replace(",", "")) for k, v in regex.findall(r"local:\S+/(\w+)\.jsonl ([\d,]+)", log)}
    longest_en = len(EN) * 20 + len(CODE) + 5  # read in order, English alone would fill the budget
    assert sum(shares.values()) >= 30000 and abs(shares["en"] - shares["zh"]) <= longest_en, log
    # Chinese text got merges: fewer tokens than characters
    assert len(tok.encode(ZH)) < len(ZH) * 0.8
    # a rerun with the same config is skipped; a changed vocab retrains
    mtime = (out / "tokenizer.json").stat().st_mtime_ns
    tkz.train_main(config.parse(config.TokenizerStage, argv))
    assert "skipping" in capsys.readouterr().err and (out / "tokenizer.json").stat().st_mtime_ns == mtime
    tkz.train_main(config.parse(config.TokenizerStage, [*argv, "--vocab-size", "300"]))
    assert Tokenizer.load(out).vocab_size == 300


def test_train_main_no_documents(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no documents"):
        tkz.train_main(config.parse(config.TokenizerStage, stage_flags("e", empty)))
