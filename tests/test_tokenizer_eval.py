"""tokenizer eval: the baseline split patterns are tiktoken's, the rank-file reader equals tiktoken's loader and a
brute-force BPE, and the bytes-per-token table is checked by recounting every token.

    .venv/bin/pytest tests/test_tokenizer_eval.py -q
"""

import base64
import dataclasses
import json
import random

import pytest
import regex
from test_tokenizer import EN, ZH, stage_flags, write_jsonl

from chatsmith import config
from chatsmith import tokenizer as tkz
from chatsmith import tokenizer_eval as tev
from chatsmith.common import UserError
from chatsmith.tokenizer import Tokenizer


def tiny_ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for merge in (b"th", b"he", b"the", b" t", b" the", b"qu", b"ick", b"ic", b"\xe6\x88", b"\xe6\x88\x91"):
        ranks[merge] = len(ranks)
    return ranks


def write_tiktoken(path, ranks):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def brute_force_bpe(text: str, pattern: str, ranks: dict[bytes, int]) -> int:
    """Token count of tiktoken's algorithm: split by the regex, then merge the lowest-ranked adjacent pair."""
    n = 0
    for piece in regex.findall(pattern, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while True:
            pairs = [(ranks.get(parts[i] + parts[i + 1], 1 << 60), i) for i in range(len(parts) - 1)]
            if not pairs or min(pairs)[0] == 1 << 60:
                break
            _, i = min(pairs)
            parts[i: i + 2] = [parts[i] + parts[i + 1]]
        n += len(parts)
    return n


def test_baseline_patterns_match_tiktoken(monkeypatch):
    from tiktoken_ext import openai_public

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: {})
    for name, ctor in (("gpt2", openai_public.r50k_base), ("cl100k", openai_public.cl100k_base),
                       ("o200k", openai_public.o200k_base)):
        spec = ctor()
        assert tev.BASELINES[name] == (spec["name"], spec["pat_str"], spec["special_tokens"])


def test_rank_file_loader(tmp_path, monkeypatch):
    from tiktoken.load import load_tiktoken_bpe

    path = tmp_path / "r50k_base.tiktoken"
    write_tiktoken(path, tiny_ranks())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache writes from the reference loader
    assert tev.read_tiktoken_ranks(path) == load_tiktoken_bpe(str(path)) == tiny_ranks()
    enc = tev.baseline_encoding("gpt2", path)
    text = "the quick thethe 我我 the"
    assert len(enc.encode_ordinary(text)) == brute_force_bpe(text, tev.BASELINES["gpt2"][1], tiny_ranks())
    path.write_text("bm90IGJhc2U2NA== 1\nnot-a-line\n")
    with pytest.raises(UserError, match="not a tiktoken rank line"):
        tev.read_tiktoken_ranks(path)


def test_eval_main_json(chatsmith_home, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CHATSMITH_TIKTOKEN_DIR", raising=False)
    corpus = tmp_path / "mixed.jsonl"
    rng = random.Random(2)
    write_jsonl(corpus, [f"{i}: " + (EN * rng.randint(1, 4) if i % 2 else ZH * rng.randint(1, 4))
                         for i in range(300)])
    tkz.train_main(config.parse(config.TokenizerStage, stage_flags("ev", corpus, extra=("--vocab-size", "400"))))
    ranks_dir = tmp_path / "ranks"
    ranks_dir.mkdir()
    write_tiktoken(ranks_dir / "r50k_base.tiktoken", tiny_ranks())
    capsys.readouterr()
    argv = stage_flags("ev", corpus, extra=("--json", "--tiktoken-dir", str(ranks_dir)))
    cfg = config.parse(tev.EvalStage, argv)
    assert cfg.eval.json and cfg.eval.tiktoken_dir == str(ranks_dir)
    tev.main(cfg)
    results = json.loads(capsys.readouterr().out)
    tok = Tokenizer.load(chatsmith_home / "runs" / "ev" / "tokenizer")
    groups = tev.held_out_texts(cfg.data, cfg.eval.max_bytes)
    assert groups["English"] and groups["Chinese"]
    assert all(t.split(": ", 1)[1].startswith("The") for t in groups["English"])
    assert all(t.split(": ", 1)[1].startswith("我们") for t in groups["Chinese"])
    for group, texts in groups.items():
        row = results["rows"][group]
        n_bytes = sum(len(t.encode()) for t in texts)
        assert row["bytes"] == n_bytes and row["docs"] == len(texts)
        assert row["chatsmith"] == pytest.approx(n_bytes / sum(len(tok.encode(t)) for t in texts), rel=1e-12)
        gpt2_tokens = sum(brute_force_bpe(t, tev.BASELINES["gpt2"][1], tiny_ranks()) for t in texts)
        assert row["gpt2"] == pytest.approx(n_bytes / gpt2_tokens, rel=1e-12)
        assert row["cl100k"] is None and row["o200k"] is None
    assert any("differs from tiktoken's published r50k_base" in n for n in results["notes"])
    assert any("cl100k_base.tiktoken not found" in n for n in results["notes"])
    # the table form names every column and marks the missing ones
    tev.main(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, json=False)))
    table = capsys.readouterr().out
    assert "chatsmith" in table and "n/a" in table and "English" in table and "Chinese" in table


def test_eval_without_tiktoken(chatsmith_home, tmp_path, capsys, monkeypatch):
    import sys

    corpus = tmp_path / "en.jsonl"
    write_jsonl(corpus, [f"{i}: {EN}" for i in range(100)])
    tkz.train_main(config.parse(config.TokenizerStage, stage_flags("nt", corpus, extra=("--vocab-size", "300"))))
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken -> ImportError
    results = tev.main(config.parse(tev.EvalStage, stage_flags("nt", corpus, extra=("--json",))))
    assert results["rows"]["English"]["gpt2"] is None and results["rows"]["English"]["chatsmith"] > 1
    assert results["rows"]["Chinese"]["docs"] == 0
    assert any("tiktoken is not installed" in n for n in results["notes"])
