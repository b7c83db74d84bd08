"""Assistant checks (chatsmith/checks.py): the identity phrasings are none of the SFT identity source's questions, the
held-out arithmetic problems are none of its train problems, the scorers on hand-made replies, and a tiny model end to
end (the JSON's fields, the same replies on a second call, the RL model's file, the report card's section).

    .venv/bin/pytest tests/test_checks.py -q
"""

import dataclasses
import importlib.util
import json
import random
import re

import pytest
import torch

from chatsmith import checkpoint, checks, config, report, rl
from chatsmith.common import UserError, run_dir
from chatsmith.data import generated, sources
from chatsmith.model import GPT
from chatsmith.tokenizer import Tokenizer
from chatsmith.tools import calculate

# ---------------------------------------------------------------------------------------------------------------------
# the prompts are held out


def sft_identity_questions() -> set[str]:
    """Every user turn the SFT identity source can write: each question of each intent, after each greeting (the
    first question of a conversation) or bare (a second question)."""
    out = set()
    for lang, intents in (("en", generated._ID_EN), ("zh", generated._ID_ZH)):
        for questions, _ in intents.values():
            for q in questions:
                out.add(q)
                for greeting in generated._ID_GREETINGS[lang]:
                    out.add(greeting + (q[0].lower() + q[1:] if greeting.endswith(", ") else q))
    return out


def test_the_enumeration_covers_what_the_identity_source_draws():
    every = sft_identity_questions()
    rng = random.Random(0)
    drawn = {m["content"] for _ in range(20000) for m in generated._identity_draw(rng)[1] if m["role"] == "user"}
    assert drawn <= every and len(drawn) > 0.9 * len(every)  # the test below compares against all of them


def test_identity_phrasings_are_not_in_the_sft_data():
    sft = {checks.normalise(q) for q in sft_identity_questions()}
    for prompts, zh in ((checks.IDENTITY_EN, False), (checks.IDENTITY_ZH, True)):
        normal = [checks.normalise(p) for p in prompts]
        assert len(prompts) == 50 and len(set(normal)) == 50  # distinct, also after normalisation
        assert not set(normal) & sft, set(normal) & sft
        assert all((checks.han_fraction(p) >= 0.5) == zh for p in prompts)
    # nor a longer SFT question (4+ words, 5+ han) with words around it ("Quick question: what is your name?")
    longer = [checks.normalise(q) for intents in (generated._ID_EN, generated._ID_ZH) for qs, _ in intents.values()
              for q in qs if (len(q.split()) >= 4 if checks.han_fraction(q) < 0.5 else len(checks.normalise(q)) >= 5)]
    padded = [(p, q) for p in checks.IDENTITY_EN + checks.IDENTITY_ZH for q in longer if q in checks.normalise(p)]
    assert len(longer) > 20 and not padded, padded
    assert checks.normalise("Hey, WHAT'S  your name？") == checks.normalise("hey what's your name?")
    assert [zh for _, zh in checks.identity_prompts(100)] == [False, True] * 50
    if importlib.util.find_spec("chatterbot_corpus") is not None:  # nor in the small-talk source, either split
        talk = {checks.normalise(m["content"]) for split in ("sft", "val")
                for conv in sources.iter_conversations("pkg:chatterbot", split) for m in conv if m["role"] == "user"}
        assert not talk & {checks.normalise(p) for p in checks.IDENTITY_EN + checks.IDENTITY_ZH}


def test_held_out_arithmetic_is_never_a_train_problem():
    problems = checks.arithmetic_problems(200, 1337)
    assert problems == checks.arithmetic_problems(200, 1337) and problems != checks.arithmetic_problems(200, 1)
    assert len({p.expression for p in problems}) == 200 and sum(p.zh for p in problems) == 100
    assert {p.op for p in problems} == {"+", "-", "*"}
    assert all(10 <= p.a <= 999 and 10 <= p.b <= 999 for p in problems)
    assert all(generated.hash_split(p.expression, "arithmetic") == "val" for p in problems)
    assert all(calculate(p.expression) == str(p.result) for p in problems)  # the result, by the calculator
    assert all(checks.han_fraction(p.question) >= 0.5 for p in problems if p.zh)
    trained = {c["arguments"]["expression"] for conv in generated.arithmetic_conversations("train", 20000, 1337)
               for m in conv for c in m.get("tool_calls") or []}
    same_shape = {e for e in trained if re.fullmatch(r"\d{2,3} [-+*] \d{2,3}", e)}
    assert len(same_shape) > 1000  # the train source does write problems of this shape...
    assert not trained & {p.expression for p in checks.arithmetic_problems(200, 7) + problems}  # ...never these


def test_check_prompts_leave_out_what_training_saw_and_what_does_not_fit():
    users = ("Hello. Who are you?", "你好吗？", "Tell me a joke.", "tell me a JOKE", "x" * 50, "今天天气怎么样？")
    convs = [[{"role": "user", "content": c}, {"role": "assistant", "content": "ok"}] for c in users]
    exclude = {checks.normalise("hello who are you")}
    got = checks.check_prompts(convs, 3, 1, fits=lambda p: len(p) < 40, exclude=exclude)
    assert got == ["你好吗？", "Tell me a joke."]  # one Chinese, then the rest: a repeat, a long one, a trained one out


# ---------------------------------------------------------------------------------------------------------------------
# scorers


def reply(expression: str | None, answer: str, name: str = "calculator") -> list[dict]:
    if expression is None:
        return [{"role": "assistant", "content": answer}]
    call = {"name": name, "arguments": {"expression": expression}}
    return [{"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": calculate(expression) if name == "calculator" else "error"},
            {"role": "assistant", "content": answer}]


def test_arithmetic_scorer_on_hand_made_replies():
    p = checks.Problem(123, "*", 45, "What is 123 × 45?", False)
    outcome = {}
    cases = {
        "right": reply("123 * 45", "123 × 45 = 5535."),
        "times sign, no spaces, thousands": reply("123×45", "The answer is 5,535."),
        "chinese": reply("123 * 45", "结果是5535。"),
        "same value, operands swapped": reply("45 * 123", "It is 5535."),
        "same value, the result itself": reply("5535", "It is 5535."),
        "same value, another expression": reply("123 * 45 + 0", "It is 5535."),
        "wrong result": reply("123 * 45", "It is 5536."),
        "result inside a longer number": reply("123 * 45", "It is 55350."),
        "a decimal": reply("123 * 45", "It is 5535.5."),
        "no call": reply(None, "123 × 45 = 5535."),
        "python instead": reply("123 * 45", "5535", name="python"),
        "call but no answer": reply("123 * 45", "")[:2],
    }
    for name, messages in cases.items():
        outcome[name] = checks.score_arithmetic(messages, p)["outcome"]
    assert outcome == {
        "right": "right", "times sign, no spaces, thousands": "right", "chinese": "right",
        "same value, operands swapped": "wrong_expression", "same value, the result itself": "wrong_expression",
        "same value, another expression": "wrong_expression", "wrong result": "wrong_result",
        "result inside a longer number": "wrong_result", "a decimal": "wrong_result", "no call": "no_call",
        "python instead": "no_call", "call but no answer": "wrong_result"}
    negative = checks.Problem(100, "-", 345, "100减345等于多少？", True)
    assert checks.score_arithmetic(reply("100 - 345", "100 - 345 = -245。"), negative)["pass"]
    assert checks.score_arithmetic(reply("100 − 345", "答案是−245。"), negative)["pass"]  # the Unicode minus
    assert not checks.score_arithmetic(reply("100 - 345", "答案是 245。"), negative)["pass"]
    assert checks.stated_integers("1,234 and 12.0, 12.5; 600-267=-333 (7)-2 12,34") == {1234, 12, 600, 267, -333, 7,
                                                                                          2}


def test_identity_scorer_needs_the_name_in_the_language_asked():
    assert checks.score_identity("I am chatsmith, a small assistant.", zh=False)["pass"]
    assert checks.score_identity("我是 chatsmith。", zh=True)["pass"]  # the name itself is not counted as English
    assert checks.score_identity("ChatSmith here.", zh=False)["pass"]
    wrong_language = checks.score_identity("I am chatsmith.", zh=True)
    assert not wrong_language["pass"] and wrong_language["name"] and not wrong_language["language"]
    assert not checks.score_identity("我是 chatsmith，一个小助手。", zh=False)["pass"]
    no_name = checks.score_identity("我是一个小助手。", zh=True)
    assert not no_name["pass"] and not no_name["name"] and no_name["language"]


def test_tally_counts_with_the_wilson_interval():
    from scipy.stats import binomtest

    t = checks.tally(45, 50, 0.9)
    ci = binomtest(45, 50).proportion_ci(0.95, method="wilson")
    assert t["frac"] == 0.9 and t["met"] is True and t["ci95"] == pytest.approx([ci.low, ci.high], abs=1e-3)
    assert checks.tally(44, 50, 0.9)["met"] is False and checks.tally(0, 0, 0.9)["met"] is None


# ---------------------------------------------------------------------------------------------------------------------
# end to end on a tiny model

TEXT = ("Who are you? I am chatsmith, a small assistant. What is 12 * 34? It is 408. Hello, how are you today?\n"
        "我是 chatsmith，一个小助手。你好！请计算 3 加 4。今天天气很好。\n")
SFT = {"mixture": ("identity:1", "arithmetic:1", "chatterbot:1"), "max_convs": 60, "val_convs": 10}
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in config.preset_smoke()["checks"].items()] + [
    "--check-identity", "6", "--check-arithmetic", "6", "--precision", "fp32"]


@pytest.fixture
def tiny_run() -> str:
    """A run with a tokenizer and a random chat model of the smoke preset's shape, as SFT would leave it."""
    tok = Tokenizer.train([TEXT * 3] * 20, 400, show_progress=False)
    run = run_dir("tiny")
    tok.save(run / "tokenizer")
    mcfg = config.make(config.PretrainStage, {"run": {"preset": "smoke"}}).model.resolve(vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    saved = config.to_dict(config.make(config.SFTStage, {"run": {"preset": "smoke", "run": "tiny"}, "sft": SFT}))
    checkpoint.save(checkpoint.stage_root(run, "chat"), 10, GPT.build(mcfg).state_dict(),
                    meta={"config": {**saved, "model": dataclasses.asdict(mcfg)}, "kind": "sft"})
    return "tiny"


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None, reason="pkg:chatterbot is not installed")
def test_checks_command_end_to_end_and_rerun(tiny_run, capsys):
    cfg = config.parse(checks.ChecksStage, ["--run", tiny_run, *FLAGS])
    first = checks.main(cfg)
    path = run_dir(tiny_run) / "chat" / "chat_checks.json"
    saved = json.loads(path.read_text())
    assert saved["model"] == "chat" and saved["checkpoint"] == "step_000010"
    assert set(saved["checks"]) == {"ended", "zh", "identity", "arithmetic"}
    for name, c in saved["checks"].items():
        assert {"n", "passed", "frac", "target", "ci95", "met"} <= set(c) and c["target"] == checks.TARGETS[name]
        assert 0 <= c["passed"] <= c["n"] and c["ci95"] == pytest.approx(checks.wilson(c["passed"], c["n"]))
    c = saved["checks"]
    assert c["ended"]["n"] + saved["skipped"]["held_out"] == 8 and c["zh"]["n"] <= 4
    assert c["identity"]["n"] + saved["skipped"]["identity"] == 6
    assert c["arithmetic"]["n"] + saved["skipped"]["arithmetic"] == 6
    assert c["arithmetic"]["en"]["n"] + c["arithmetic"]["zh"]["n"] == c["arithmetic"]["n"]
    assert sum(c["arithmetic"][k] for k in ("no_call", "wrong_expression", "wrong_result")) == (
        c["arithmetic"]["n"] - c["arithmetic"]["passed"])
    assert saved["sampling"]["temperature"] == 0.6 and saved["sampling"]["max_tokens"] == 16
    assert len(saved["replies"]) == sum(c[k]["n"] for k in ("ended", "identity", "arithmetic"))
    assert {"check", "prompt", "reply", "pass", "tool_calls"} <= set(saved["replies"][0])
    assert saved["prompts"] == c["ended"]["n"] and saved["ended_with_im_end"] == c["ended"]["passed"]  # flat fields
    assert "identity" in capsys.readouterr().out
    again = checks.main(cfg)
    assert [r["reply"] for r in again["replies"]] == [r["reply"] for r in first["replies"]]
    assert checks.up_to_date(path, cfg.checks, "step_000010")  # what SFT and RL look at before running them again
    assert not checks.up_to_date(path, cfg.checks, "step_000011")
    assert not checks.up_to_date(path, dataclasses.replace(cfg.checks, check_identity=7), "step_000010")

    with pytest.raises(UserError, match="no RL model"):
        checks.main(config.parse(checks.ChecksStage, ["--run", tiny_run, "--stage", "rl", *FLAGS]))
    ck = checkpoint.load_latest(checkpoint.stage_root(run_dir(tiny_run), "chat"))
    checkpoint.save(checkpoint.stage_root(run_dir(tiny_run), "rl"), 3, ck.model, meta={**ck.meta, "kind": "rl"})
    rl_result = checks.main(config.parse(checks.ChecksStage, ["--run", tiny_run, *FLAGS]))  # auto: the RL model
    assert rl_result["model"] == "rl" and (run_dir(tiny_run) / "rl" / "chat_checks.json").exists()
    sft_again = checks.main(config.parse(checks.ChecksStage, ["--run", tiny_run, "--stage", "chat", *FLAGS]))
    assert sft_again["model"] == "chat" and [r["reply"] for r in sft_again["replies"]] == [
        r["reply"] for r in first["replies"]]  # --stage chat: the SFT model although an RL model exists
    lines = "\n".join(checks.report_lines(run_dir(tiny_run)))
    assert "| check | target | SFT passed/n |" in lines and "RL passed/n" in lines and "final model: RL" in lines
    ended = c["ended"]
    assert f"| ended | 0.97 | {ended['passed']}/{ended['n']} |" in lines
    text = report.write(run_dir(tiny_run), measure_tokenizer=False).read_text(encoding="utf-8")
    assert "## Assistant checks" in text and lines in text


def test_report_without_checks_says_so(tiny_run):
    assert checks.report_lines(run_dir(tiny_run))[0].startswith("No assistant checks recorded")


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None, reason="pkg:chatterbot is not installed")
def test_rl_runs_the_checks_on_its_model(tiny_run):
    flags = ["--run", tiny_run, "--task", "seven", "--steps", "1", "--prompts", "1", "--group", "2", "--max-tokens",
             "4", "--eval-prompts", "0", *FLAGS]
    summary = rl.main(config.parse(rl.RLStage, flags))
    saved = json.loads((run_dir(tiny_run) / "rl" / "chat_checks.json").read_text())
    assert saved["model"] == "rl" and saved["checkpoint"] == "step_000001"
    assert summary["chat_checks"]["checks"] == saved["checks"]
