"""GRPO (chatsmith/rl.py): the objective on hand-computed numbers, the clip, the loss mask of tool output, a toy task
that RL learns in a few steps on CPU, exact kill + resume, and the loader picking the RL model.

    .venv/bin/pytest tests/test_rl.py -q
"""

import dataclasses
import json
import math

import pytest
import torch

from chatsmith import checkpoint, config, rl
from chatsmith.checkpoint import LoadConfig, load_model
from chatsmith.common import UserError, run_dir
from chatsmith.model import GPT, ModelConfig
from chatsmith.tokenizer import Tokenizer

TEXT = ("Say a number. Pick a number. 1 2 3 4 5 6 7 8 9 0. The answer is 7. What is 12 * 34? It is 408.\n"
        "Give me a number. Any number? Name a number. 7 7 7. 我们今天学习语言模型。\n")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT * 3] * 20, 300, show_progress=False)


def make_run(tok: Tokenizer, name: str = "toy", seed: int = 0) -> ModelConfig:
    """A run with a tokenizer and a tiny random chat model (what SFT would leave), in the test's CHATSMITH_HOME."""
    run = run_dir(name)
    tok.save(run / "tokenizer")
    mcfg = ModelConfig(depth=1, n_embd=32, head_dim=16, vocab_size=tok.vocab_size, seq_len=128).resolve()
    torch.manual_seed(seed)
    model = GPT.build(mcfg)
    checkpoint.save(checkpoint.stage_root(run, "chat"), 1, model.state_dict(),
                    meta={"config": {"model": dataclasses.asdict(mcfg)}})
    return mcfg


def stage(*flags: str) -> rl.RLStage:
    return config.parse(rl.RLStage, ["--run", "toy", "--precision", "fp32", *flags])


# ---------------------------------------------------------------------------------------------------------------------
# the objective


def test_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    a = rl.advantages(r, 4, "group")
    std = math.sqrt(((0.5**2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert a.tolist() == pytest.approx(expected, abs=1e-6)
    assert rl.advantages(r, 4, "mean").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_policy_loss_by_hand_and_token_normalisation():
    logp_old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]))
    logp = torch.log(torch.tensor([[0.55, 0.75, 0.5], [0.25, 0.2125, 0.25]])).requires_grad_()
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, stats = rl.policy_loss(logp, logp_old, adv, mask, clip_eps=0.2, total_tokens=10.0)
    # row 0: ratios 1.1, 1.5, (1.0 masked); A = 1: -min(1.1, 1.1) = -1.1, -min(1.5, 1.2) = -1.2
    # row 1: ratios 1.0, 0.85, 1.0; A = -2: -min(-2, -2) = 2, -min(-1.7, -1.7) = 1.7, 2
    assert loss.item() == pytest.approx((-1.1 - 1.2 + 2 + 1.7 + 2) / 10.0, abs=1e-6)
    assert stats["clipped"] == 1  # only the 1.5 ratio with a positive advantage sits outside the clip
    loss.backward()
    g = logp.grad
    # d/dlogp of -ratio * A / 10 = -ratio * A / 10 where unclipped; 0 where the clipped term is the min; 0 where masked
    assert g[0].tolist() == pytest.approx([-1.1 / 10, 0.0, 0.0], abs=1e-6)
    assert g[1].tolist() == pytest.approx([2.0 / 10, 1.7 / 10, 2.0 / 10], abs=1e-6)


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_clip_acts_only_when_the_ratio_leaves_the_range(adv):
    eps = 0.2
    ratios = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 2.0])
    logp = torch.log(ratios).requires_grad_()
    loss, _ = rl.policy_loss(logp[None], torch.zeros(1, 7), torch.tensor([adv]), torch.ones(1, 7), eps, 1.0)
    loss.backward()
    for r, g in zip(ratios.tolist(), logp.grad.tolist()):
        outside = r < 1 - eps if adv < 0 else r > 1 + eps  # the side where clipping bounds the improvement
        assert (g == 0) == outside, (r, g)
        if not outside:
            assert g == pytest.approx(-r * adv)


def test_kl_penalty_is_k3_and_zero_at_the_reference():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    loss0, stats0 = rl.policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 2), 0.2, 2.0, logp, 1.0)
    assert loss0.item() == pytest.approx(0.0) and stats0["kl"] == pytest.approx(0.0)
    ref = torch.log(torch.tensor([[0.25, 0.4]]))
    loss, stats = rl.policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 2), 0.2, 2.0, ref, 0.5)
    k3 = [math.exp(d) - d - 1 for d in (math.log(0.25 / 0.5), math.log(0.4 / 0.2))]
    assert stats["kl"] == pytest.approx(sum(k3)) and loss.item() == pytest.approx(0.5 * sum(k3) / 2.0)


def test_tool_output_is_masked_and_carries_no_gradient(tok):
    messages = [{"role": "user", "content": "What is 12 * 34?"},
                {"role": "assistant", "content": "Let me see.",
                 "tool_calls": [{"name": "calculator", "arguments": {"expression": "12 * 34"}}]},
                {"role": "tool", "content": "408 TOOLTEXT"},
                {"role": "assistant", "content": "It is 408."}]
    ids, mask = rl.trajectory(tok, messages, ended=True, max_len=10_000)
    tool_ids = tok.encode("408 TOOLTEXT")
    start = next(i for i in range(len(ids)) if ids[i:i + len(tool_ids)] == tool_ids)
    assert not any(mask[start:start + len(tool_ids)])  # the tool's output
    assert tok.decode([t for t, m in zip(ids, mask) if m]).count("408") == 1  # only the model's "It is 408."
    # cut by max_tokens: the final <|im_end|> was never emitted, so it is not trained on
    _, cut = rl.trajectory(tok, messages, ended=False, max_len=10_000)
    assert sum(mask) - sum(cut) == 1
    mcfg = ModelConfig(depth=1, n_embd=32, head_dim=16, vocab_size=tok.vocab_size, seq_len=128).resolve()
    model = GPT.build(mcfg)
    torch.nn.init.normal_(model.embed_tokens.weight)
    (_, x, y, m), = rl._batches([(ids, mask)], 4)
    # the gradient of the loss w.r.t. each position's log-prob: zero on the tool's output and every masked token
    logp = rl.token_logprobs(model, x, y)
    logp.retain_grad()
    loss, _ = rl.policy_loss(logp, logp.detach(), torch.tensor([1.0]), m, 0.2, float(m.sum()))
    loss.backward()
    assert torch.all(logp.grad[m == 0] == 0) and torch.all(logp.grad[m == 1] != 0)
    assert torch.all(logp.grad[0, start - 1:start - 1 + len(tool_ids)] == 0)  # targets = the tool's tokens


# ---------------------------------------------------------------------------------------------------------------------
# tasks


def test_tasks_split_train_and_eval_disjointly():
    for name in ("seven", "arithmetic"):
        task = rl.Task(name)
        train, held = task.items("train", 0, 40), task.items("eval", 0, 10)
        assert len(train) == 40 and len(held) == 10
        assert not {i.question for i in train} & {i.question for i in held}
        assert task.items("train", 0, 40) == train  # deterministic
    item = rl.Task("arithmetic").items("eval", 3, 1)[0]
    assert rl.Task("arithmetic").score(f"So the result is {item.answer}.", item) == 1.0
    assert rl.Task("arithmetic").score("no idea", item) == 0.0
    assert rl.Task("gsm8k").score("It costs 1,234 dollars.", rl.Item("q", "1234")) == 1.0
    assert rl.Task("gsm8k").score("3 apples and 12.0 pears", rl.Item("q", "12")) == 1.0


def test_reasoning_gym_tasks_never_train_on_an_eval_question(monkeypatch):
    from chatsmith.tasks import arithmetic

    asked = [e for e in arithmetic.dataset("calc")]  # what `chatsmith eval --tasks calc` asks
    fresh = [e for e in arithmetic.dataset("calc", size=300, seed=1)]
    monkeypatch.setattr(rl.Task, "_dataset", lambda self, seed, size: asked[:100] + fresh)  # a draw that collides
    items = rl.Task("calc").items("train", 0, 20)
    assert len(items) == 20 and {i.question for i in items} <= {e["question"] for e in fresh}
    assert not {i.question for i in items} & {e["question"] for e in asked}
    assert rl.Task("calc").score(f"It comes to {items[0].answer}.", items[0]) == 1.0


def test_mixture_task_takes_its_parts_in_turn_and_scores_each_by_its_own_rule():
    items = rl.Task("calc_checks").items("train", 0, 6)
    assert [i.task for i in items] == ["calc", "checks"] * 3
    assert [i.question for i in items[::2]] == [i.question for i in rl.Task("calc").items("train", 0, 3)]
    assert [i.question for i in items[1::2]] == [i.question for i in rl.Task("checks").items("train", 0, 3)]
    mixed = rl.Task("calc_checks")
    assert mixed.score(f"It comes to {items[0].answer}.", items[0]) == 1.0  # reasoning-gym's scorer, no call needed
    zh = next(i for i in rl.Task("checks").items("train", 0, 20) if i.entry.zh)
    zh = rl.dataclasses.replace(zh, task="checks")
    call = [{"role": "assistant", "content": "", "tool_calls": [
        {"name": "calculator", "arguments": {"expression": zh.entry.expression}}]},
        {"role": "tool", "content": zh.answer}]
    said_zh, said_en = f"结果是 {zh.answer}。", f"The answer is {zh.answer}."
    assert mixed.score(said_zh, zh, [*call, {"role": "assistant", "content": said_zh}]) == 1.0
    assert mixed.score(said_en, zh, [*call, {"role": "assistant", "content": said_en}]) == 0.0  # wrong language
    assert mixed.score(said_zh, zh, [{"role": "assistant", "content": said_zh}]) == 0.0  # no calculator call


def test_identity_task_asks_the_sft_sources_questions_never_a_checks_phrasing_and_wants_the_name_in_language():
    from chatsmith import checks
    from chatsmith.data import generated

    train, held = rl.Task("identity").items("train", 0, 300), rl.Task("identity").items("eval", 0, 60)
    asked = {q for q, _ in generated.identity_questions()}
    assert {i.question for i in train} <= asked and not {i.question for i in train} & {i.question for i in held}
    assert {i.entry for i in train} == {False, True}  # both languages
    assert all(i.entry == (checks.han_fraction(i.question) >= 0.5) for i in train + held)
    phrasings = {checks.normalise(q) for q in (*checks.IDENTITY_EN, *checks.IDENTITY_ZH)}
    assert not {checks.normalise(q) for q in asked} & phrasings  # the identity check stays held out
    en, zh = next(i for i in train if not i.entry), next(i for i in train if i.entry)
    task = rl.Task("identity")
    assert task.score("I am chatsmith, a small model.", en) == 1.0
    assert task.score("我是 chatsmith，一个小模型。", zh) == 1.0
    assert task.score("I am chatsmith, a small model.", zh) == 0.0  # not in the language asked
    assert task.score("我是一个小模型。", zh) == 0.0  # no name
    with pytest.raises(UserError, match="fewer"):
        task.items("eval", 0, 10_000)
    mixed = rl.Task("assistant").items("train", 0, 6)
    assert [i.task for i in mixed] == ["calc", "checks", "identity"] * 2
    assert rl.Task("assistant").score("我是 chatsmith。", mixed[2]) == task.score("我是 chatsmith。", mixed[2])


def test_custom_reward_and_its_errors(tmp_path, monkeypatch):
    (tmp_path / "myreward.py").write_text("def score(conversation, answer):\n    return float(len(conversation))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rl.load_reward("myreward:score")([{}, {}], "7") == 2.0
    for bad in ("myreward", "myreward:nothing", "no_such_module_xyz:f"):
        with pytest.raises(UserError):
            rl.load_reward(bad)


# ---------------------------------------------------------------------------------------------------------------------
# the stage


TOY = ("--task", "seven", "--prompts", "4", "--group", "8", "--max-tokens", "8", "--eval-prompts", "0",
       "--no-tools", "--matrix-lr", "0.05", "--head-lr", "0.05", "--embed-lr", "0.1", "--warmdown-frac", "0",
       "--check-prompts", "0", "--check-identity", "0", "--check-arithmetic", "0")  # checks: tests/test_checks.py


def train_records(name: str = "toy") -> list[dict]:
    path = run_dir(name) / "rl" / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "dt"} for r in recs if r["kind"] == "train"]


def test_rl_raises_the_reward_of_a_weak_policy_on_a_toy_task(tok):
    make_run(tok)
    rl.main(stage(*TOY, "--steps", "6"))
    rewards = [r["reward"] for r in train_records()]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.2, rewards


def test_kill_and_resume_reproduce_the_uninterrupted_run(tok, monkeypatch):
    flags = (*TOY, "--steps", "4", "--prompts", "2", "--group", "4", "--max-tokens", "4", "--slots", "1",
             "--ckpt-every", "1", "--iterations", "2")
    make_run(tok, "toy")
    rl.main(stage(*flags))
    uninterrupted = train_records()
    for p in (run_dir("toy") / "rl").iterdir():  # start over in the same run
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
    real_save = checkpoint.save

    def save_then_die(root, step, *args, **kwargs):
        real_save(root, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        rl.main(stage(*flags))
    monkeypatch.setattr(checkpoint, "save", real_save)
    with pytest.raises(UserError, match="--resume"):
        rl.main(stage(*flags))
    rl.main(stage(*flags, "--resume"))
    assert train_records() == uninterrupted


def test_chat_loads_the_rl_model_before_the_sft_model(tok):
    mcfg = make_run(tok)
    sft_model = load_model(LoadConfig(run="toy", precision="fp32"))
    assert sft_model.checkpoint.parent.parent.name == "chat"
    model = GPT.build(mcfg)
    checkpoint.save(checkpoint.stage_root(run_dir("toy"), "rl"), 3, model.state_dict(),
                    meta={"config": {"model": dataclasses.asdict(mcfg)}})
    loaded = load_model(LoadConfig(precision="fp32"))  # no --run: the newest run with a chat model
    assert loaded.is_chat and loaded.checkpoint.parent.parent.name == "rl" and loaded.checkpoint.name == "step_000003"


def test_missing_chat_model_is_one_sentence(tok):
    run = run_dir("toy")
    tok.save(run / "tokenizer")
    with pytest.raises(UserError, match="no chat model"):
        rl.main(stage())
