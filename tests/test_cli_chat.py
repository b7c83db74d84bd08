"""Terminal chat (the tool loop itself, turns.chat, is tested in test_turns.py).

The CLI (cli.main with injected streams) on a tiny random model saved as a run in a temporary CHATSMITH_HOME: the
one-shot reply and every interactive reply equal greedy decoding of the reference conversation by the engine;
/system, /temp, /clear, /help, /quit, backslash and paste-mode input; context overflow drops the oldest exchanges
(the kept ones checked against brute force); missing runs give one sentence; tool calls shown between streamed text.

    .venv/bin/pytest tests/test_cli_chat.py -q
"""

import io
import itertools
import random
from dataclasses import asdict

import pytest
import torch
from conftest import randomize_weights
from test_turns import USER, call_text, scripted_engine

from chatsmith import checkpoint, config
from chatsmith.checkpoint import NO_MODEL, load_model
from chatsmith.cli import HELP, ChatStage, fit_context, main
from chatsmith.common import UserError, run_dir
from chatsmith.engine import Engine
from chatsmith.model import GPT, ModelConfig
from chatsmith.sampling import SamplingParams
from chatsmith.tokenizer import Tokenizer

TEXT = ("Hello there! What is 12*34? The answer is 408. Let me compute that with a tool call.\n"
        "print(sum(range(10))) while True: pass\n我们今天学习语言模型。\n")


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT * 3] * 20, 300, show_progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# the CLI on a tiny random model saved as a run


def save_run(tok: Tokenizer, name: str = "tiny", seq_len: int = 128, chat_dir: bool = True) -> ModelConfig:
    cfg = ModelConfig(depth=1, n_embd=32, head_dim=16, seq_len=seq_len).resolve(tok.vocab_size)
    model = GPT.build(cfg)
    randomize_weights(model)  # so that greedy replies vary with the prompt
    run = run_dir(name)
    tok.save(run / "tokenizer")
    root = run / "chat" / "checkpoints" if chat_dir else run / "checkpoints"
    checkpoint.save(root, 5, model.state_dict(), meta={"config": {"model": asdict(cfg)}}, rng=False)
    return cfg


def stage(*flags: str) -> ChatStage:
    """The chat stage with no repetition penalty (unless given), so replies compare with plain greedy decoding."""
    pen = () if "--repetition-penalty" in flags else ("--repetition-penalty", "1")
    # fp32: auto precision may pick bf16 on this CPU, and the references decode without autocast
    return config.parse(ChatStage, ["--precision", "fp32", *pen, *flags], prog="chatsmith chat")


def reference_reply(messages: list[dict], max_tokens: int, name: str = "tiny") -> str:
    """Greedy decoding of the conversation by a fresh engine on the saved model."""
    loaded = load_model(stage("--run", name).load)
    engine = Engine(loaded.model, loaded.tokenizer, slots=1)
    return engine.generate(loaded.tokenizer.render_for_completion(messages),
                           SamplingParams(max_tokens=max_tokens, temperature=0)).text


def run_main(cfg: ChatStage, stdin_text: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(cfg, stdin=io.StringIO(stdin_text), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def test_one_shot_prints_the_greedy_reply(tok):
    save_run(tok)
    rc, out, err = run_main(stage("-p", "What is 12*34?", "--temperature", "0", "--max-tokens", "12"))
    expected = reference_reply([{"role": "user", "content": "What is 12*34?"}], 12)
    assert rc == 0 and expected.strip() and out == expected + "\n"
    assert "error" not in err


def test_repetition_penalty_reaches_the_engine(tok):
    save_run(tok)
    assert config.parse(ChatStage, []).chat.repetition_penalty == 1.1  # the default, as llama.cpp and Ollama
    cfg = stage("-p", "What is 12*34?", "--temperature", "0", "--max-tokens", "40", "--repetition-penalty", "3")
    rc, out, _ = run_main(cfg)
    loaded = load_model(stage("--run", "tiny").load)
    prompt = loaded.tokenizer.render_for_completion([{"role": "user", "content": "What is 12*34?"}])
    with_penalty = Engine(loaded.model, loaded.tokenizer, slots=1).generate(
        prompt, SamplingParams(max_tokens=40, temperature=0, repetition_penalty=3.0)).text
    assert rc == 0 and out == with_penalty + "\n"
    assert with_penalty != reference_reply([{"role": "user", "content": "What is 12*34?"}], 40)  # it changes tokens


def test_interactive_session_commands_and_multiline_input(tok):
    save_run(tok)
    stdin = "\n".join([
        "/system Be brief.",
        "/temp 0",
        "/temp hot",
        "hello\\",  # continues on the next line
        "there",
        "/help",
        "/clear",
        '"""',  # paste mode
        "print(1)",
        "/not a command in paste mode",
        '"""',
        "/frobnicate",
        "/quit",
        "never read",
    ]) + "\n"
    rc, out, err = run_main(stage("--run", "tiny", "--max-tokens", "10"), stdin)
    system = {"role": "system", "content": "Be brief."}
    first = reference_reply([system, {"role": "user", "content": "hello\nthere"}], 10)
    # after /clear the earlier exchange is gone: the reply only sees the system prompt and the pasted block
    second = reference_reply([system, {"role": "user", "content": "print(1)\n/not a command in paste mode"}], 10)
    assert first != second
    assert rc == 0 and out == first + "\n" + HELP + "\n" + second + "\n"
    for words in ("system prompt set: Be brief.", "temperature 0", "/temp needs a number", "conversation cleared",
                  "unknown command '/frobnicate'", "context 128 tokens"):
        assert words in err


def test_end_of_input_ends_the_session_and_the_conversation_is_kept(tok):
    save_run(tok)
    rc, out, err = run_main(stage("--temperature", "0", "--max-tokens", "6"), "one\ntwo\n")
    r1 = reference_reply([{"role": "user", "content": "one"}], 6)
    r2 = reference_reply([{"role": "user", "content": "one"}, {"role": "assistant", "content": r1},
                          {"role": "user", "content": "two"}], 6)
    assert rc == 0 and out == r1 + "\n" + r2 + "\n"


def test_fit_context_keeps_the_longest_suffix_of_exchanges_that_fits():
    rng = random.Random(0)
    for _ in range(300):
        system = [{"role": "system", "content": "s" * rng.randint(0, 3)}][:rng.randint(0, 1)]
        groups = [[{"role": "user", "content": "u" * rng.randint(1, 5)}]
                  + [{"role": rng.choice(["assistant", "tool"]), "content": "a" * rng.randint(0, 5)}
                     for _ in range(rng.randint(0, 3))] for _ in range(rng.randint(1, 6))]
        messages = system + [m for g in groups for m in g]

        def count(msgs):
            return sum(len(m["content"]) + 1 for m in msgs)

        limit = rng.randint(1, 40)
        kept, dropped = fit_context(count, messages, limit)
        fits = [k for k in range(len(groups)) if count(system + [m for g in groups[k:] for m in g]) <= limit]
        best = min(fits) if fits else len(groups) - 1  # brute force: the first start that fits, else the last one
        assert dropped == best and kept == system + [m for g in groups[best:] for m in g]


def test_context_overflow_drops_oldest_exchanges_without_crashing(tok):
    save_run(tok, seq_len=128)  # the tiny tokenizer spends ~40 tokens on each message: 2 exchanges fit at most
    lines = [f"m{i}: What is 12*34?" for i in range(6)]
    rc, out, err = run_main(stage("--system", "Use tools.", "--temperature", "0", "--max-tokens", "8"),
                            "\n".join(lines) + "\n" + "x" * 400 + "\nlast\n")
    assert rc == 0
    assert "dropped the oldest" in err
    assert "that message needs" in err  # the 400-char message alone does not fit: refused, the session goes on
    assert out.count("\n") == 7  # one reply per message that fits: 6 + "last"
    # the same session step by step: every prompt fits, and the kept exchanges are the newest ones
    from chatsmith.cli import ChatSession

    loaded = load_model(stage().load)
    engine = Engine(loaded.model, loaded.tokenizer, slots=1)
    prompts = []
    submit = engine.submit
    engine.submit = lambda ids, params, **kw: prompts.append(len(ids)) or submit(ids, params, **kw)
    session = ChatSession(engine, loaded.tokenizer, stage("--system", "Use tools.", "--temperature", "0",
                                                          "--max-tokens", "8").chat,
                          io.StringIO(), io.StringIO(), io.StringIO())
    for line in lines:
        assert session.reply(line)
        assert session.messages[-2]["content"] == line  # the newest exchange is always kept
    assert max(prompts) <= 128 - 8 and len(session.messages) < 2 * len(lines)
    assert not session.reply("x" * 400) and session.messages[-2]["content"] == lines[-1]


def test_missing_model_is_one_sentence(tok):
    with pytest.raises(UserError) as e:
        main(stage())
    assert str(e.value) == NO_MODEL
    run_dir("empty")
    with pytest.raises(UserError, match="no chat model found; run `chatsmith speedrun` first"):
        main(stage("--run", "empty"))
    with pytest.raises(UserError, match="does not exist"):
        main(stage("--run", "nope"))
    with pytest.raises(UserError, match="--temperature must be at least 0"):  # checked before looking for a model
        main(stage("--temperature", "-1"))


def test_session_shows_tool_calls_between_streamed_text(tok):
    from chatsmith.cli import ChatSession

    call = {"name": "calculator", "arguments": {"expression": "12*34+0.1"}}
    first = {"role": "assistant", "content": "Let me compute.", "tool_calls": [call]}
    engine = scripted_engine(tok, [(USER, "Let me compute.\n" + call_text(**call)),
                                   (USER + [first, {"role": "tool", "content": "408.1"}], "It is 408.1.")])
    out = io.StringIO()
    session = ChatSession(engine, tok, stage("--system", "Use tools.").chat, io.StringIO(), out, io.StringIO())
    assert session.reply("What is 12*34+0.1?")
    assert out.getvalue() == 'Let me compute.\n\n[calculator {"expression": "12*34+0.1"} -> 408.1]\nIt is 408.1.\n'
    assert session.messages[1:] == [first, {"role": "tool", "content": "408.1"},
                                    {"role": "assistant", "content": "It is 408.1."}]


def test_base_model_fallback_warns_and_checkpoint_flag_loads(tok, capsys):
    save_run(tok, name="base", chat_dir=False)
    loaded = load_model(stage("--run", "base").load)
    assert not loaded.is_chat and "base model" in capsys.readouterr().err
    path = run_dir("base") / "checkpoints" / "step_000005"
    by_path = load_model(stage("--checkpoint", str(path)).load)
    assert by_path.checkpoint == path and by_path.run == run_dir("base")
    for a, b in itertools.zip_longest(loaded.model.state_dict().values(), by_path.model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.get_num_threads() == 1  # --threads defaults to 1 for decoding
