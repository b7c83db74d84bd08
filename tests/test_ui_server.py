"""The web chat against the REAL `chatsmith` server (its own UI at /), driven in headless Debian chromium by Playwright.

    python -m pytest -q tests/test_ui_server.py            # the screenshot lands in artifacts/ui-real.png
    python -m pytest -q -m slow tests/test_ui_server.py    # also the cpu-shaped model (context 512)

tests/test_ui.py checks the page in detail against a fake backend; this file checks that page and server fit together.
Random models are saved as runs in the test's CHATSMITH_HOME and loaded as `chatsmith serve` loads them
(`load_into`), then served by `serve_in_thread`. Choices:
- Greedy decoding (temperature 0 set in the settings panel), so every reply the page stores is compared with the
  engine's own decoding of the same conversation on a separately loaded copy of the model, with the server's chat
  defaults for what the page leaves out.
- The stop test's model is slowed by THROTTLE seconds per forward (its `forward_cached` wrapped), so the text can be
  watched growing and Stop pressed mid-reply, and its end-of-turn logits are masked, so every reply runs to
  max_tokens (with the chat defaults' repetition penalty the tiny random model ends most replies at once).
- The cpu-shaped test (slow) uses the cpu preset's model shape with random weights: every reply runs to the end of
  the 512-token context, the hardest case for the next prompt of a conversation.
- Hostile output: a random model cannot be made to write HTML, so that test serves the scripted model of
  tests/test_server.py (one-hot logits that spell a fixed reply) through the same server and UI.

Skips (with the reason) when playwright, fastapi/uvicorn or chromium is missing.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("fastapi", reason="fastapi is not installed")
pytest.importorskip("uvicorn", reason="uvicorn is not installed")
from test_cli_chat import TEXT, save_run  # noqa: E402
from test_server import ScriptedModel, metric  # noqa: E402
from test_ui import browser, send  # noqa: E402, F401  (browser: the shared chromium fixture; skips without it)

from chatsmith import checkpoint  # noqa: E402
from chatsmith.bench import _randomize, bench_ref, bench_tokenizer  # noqa: E402
from chatsmith.checkpoint import LoadConfig, load_model  # noqa: E402
from chatsmith.common import run_dir  # noqa: E402
from chatsmith.engine import Engine  # noqa: E402
from chatsmith.model import GPT  # noqa: E402
from chatsmith.sampling import CHAT_DEFAULTS  # noqa: E402
from chatsmith.server import ServeConfig, Server, load_into, serve_in_thread  # noqa: E402
from chatsmith.tokenizer import Tokenizer  # noqa: E402

expect = sync_api.expect
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
MAX_TOKENS = 120
THROTTLE = 0.01  # seconds per forward of the served model: a 120-token reply takes >= 1.2 s
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> **bold** [x](javascript:window.__xss=3)'
BG = "getComputedStyle(document.body).backgroundColor"
CONVERSATIONS = "JSON.parse(localStorage.getItem('chatsmith.conversations.v1'))"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT * 3] * 20, 300, show_progress=False)


@pytest.fixture
def serve():
    """serve(server) -> base URL of the real server in a thread; stopped after the test."""
    started = []

    def _serve(server: Server) -> str:
        uv, url = serve_in_thread(server)
        started.append((uv, server))
        return url

    yield _serve
    for uv, server in started:
        uv.should_exit = True
        uv.thread.join(timeout=10)
        server.stop()


@pytest.fixture
def open_page(browser):  # noqa: F811 (the fixture imported from test_ui)
    """open_page(url, model_id) -> a fresh page (own localStorage) on the server's UI; fails the test on a JS error."""
    contexts, errors = [], []

    def _open(url: str, model_id: str):
        ctx = browser.new_context(viewport={"width": 1200, "height": 760}, color_scheme="light")
        ctx.set_default_timeout(20_000)  # a busy 2-core machine can be slow
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda err: errors.append(err))
        page.requests = []  # (method, path, JSON body) of every API call the page makes
        page.on("request", lambda r: "/v1/" in r.url and page.requests.append(
            (r.method, r.url[len(url):], r.post_data_json if r.method == "POST" else None)))
        page.goto(url + "/")
        expect(page.locator("#model-badge")).to_have_text(model_id)  # GET /v1/models answered
        return page

    yield _open
    for ctx in contexts:
        ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def wait_idle(page) -> None:
    expect(page.locator("#send")).to_be_visible(timeout=60_000)  # a busy 2-core machine can be very slow
    expect(page.locator(".msg.streaming")).to_have_count(0)
    expect(page.locator("#notice")).to_be_hidden()  # no error shown (e.g. a 400 from the server)


def stored_messages(page) -> list[dict]:
    """The active conversation as the page keeps it in localStorage (raw text, not the rendered markdown)."""
    [conv] = page.evaluate(CONVERSATIONS)
    return [{"role": m["role"], "content": m["content"]} for m in conv["messages"]]


def watch_stream(page, seconds: float = 20.0) -> list[str]:
    """The streaming bubble's text, sampled every ~20 ms until the reply is done."""
    samples, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = page.evaluate("document.querySelector('.msg.streaming .body')?.textContent ?? null")
        if text is None:
            break
        if not samples or samples[-1] != text:
            samples.append(text)
        time.sleep(0.02)
    return samples


def never_ends(model, tok, throttle: float = 0.0) -> None:
    """Mask the model's end-of-turn logits (so every reply runs to max_tokens, as a stop test needs: with the chat
    defaults' repetition penalty this random model otherwise ends most replies after a few tokens), and sleep
    `throttle` seconds before each forward."""
    forward = model.forward_cached

    def wrapped(*args, **kwargs):
        time.sleep(throttle)
        logits = forward(*args, **kwargs)
        logits[..., [tok.special_id("<|im_end|>"), tok.bos_id]] = float("-inf")
        return logits

    model.forward_cached = wrapped


def test_chat_stream_stop_reload_and_dark_mode_on_the_real_server(tok, serve, open_page):
    save_run(tok, name="tiny", seq_len=2048)  # re-encoded random replies are long
    server = Server(ServeConfig(slots=2, max_queue=2))
    load_into(server, LoadConfig(precision="fp32"))  # as `chatsmith serve` with no --run: the newest run (fp32, as the
    # reference below: auto precision may pick bf16 on this CPU)
    never_ends(server.engine.model, server.tokenizer, THROTTLE)
    url = serve(server)
    loaded = load_model(LoadConfig(run="tiny", precision="fp32"))  # the reference: an unthrottled copy of the model
    never_ends(loaded.model, loaded.tokenizer)
    reference = Engine(loaded.model, loaded.tokenizer, slots=1)

    def greedy(messages: list[dict]):  # the page sends temperature and max_tokens; the rest is the server's default
        return reference.generate(loaded.tokenizer.render_for_completion(messages),
                                  dataclasses.replace(CHAT_DEFAULTS, max_tokens=MAX_TOKENS, temperature=0))

    page = open_page(url, "tiny")
    page.click("#open-settings")
    page.fill("[name=temperature]", "0")
    page.fill("[name=max_tokens]", str(MAX_TOKENS))
    page.click("#settings button[value=close]")
    expect(page.locator("#settings")).to_be_hidden()

    # 1. send a message: the reply grows while it streams and ends as the engine's greedy reply
    send(page, "Hello there!")
    samples = watch_stream(page)
    wait_idle(page)
    ref = greedy([{"role": "user", "content": "Hello there!"}])
    assert ref.finish_reason == "length", "precondition: the model writes all MAX_TOKENS tokens for this prompt"
    grown = [s for s in samples if s]  # the bubble is empty until the first paint
    assert len({len(s) for s in grown}) >= 5 and len(grown[0]) < len(grown[-1]), samples  # grew, not in one piece
    messages = stored_messages(page)
    assert messages == [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": ref.text}]
    posts = [r for r in page.requests if r[0] == "POST"]
    assert [p[1] for p in posts] == ["/v1/chat/completions"]
    assert posts[0][2]["stream"] is True and posts[0][2]["model"] == "tiny"
    assert (posts[0][2]["temperature"], posts[0][2]["max_tokens"]) == (0, MAX_TOKENS)
    expect(page.locator(".msg.assistant .note")).to_have_text("Cut off at the max tokens limit (see Settings).")
    tokens_before = metric(url, "chatsmith_completion_tokens_total")
    assert tokens_before == MAX_TOKENS

    # 2. stop mid-reply: the text freezes, the server cancels the sequence, the page takes a new message
    send(page, "Count to ten, please.")
    reply = page.locator(".msg.assistant .body").last
    expect(page.locator(".msg.streaming .body")).not_to_have_text("")
    time.sleep(0.3)
    page.click("#stop")
    wait_idle(page)
    expect(page.locator(".msg.assistant .note").last).to_have_text("Stopped.")
    partial = stored_messages(page)[-1]["content"]
    shown = reply.text_content()
    time.sleep(0.5)
    assert reply.text_content() == shown and stored_messages(page)[-1]["content"] == partial
    full = greedy(messages + [{"role": "user", "content": "Count to ten, please."}])
    assert partial and full.text.startswith(partial) and len(partial) < len(full.text)  # a true prefix
    deadline = time.monotonic() + 5
    while metric(url, 'chatsmith_cancelled_total{reason="disconnect"}') < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, 'chatsmith_cancelled_total{reason="disconnect"}') == 1
    assert metric(url, "chatsmith_live_sequences") == 0 and server.in_flight == 0
    assert metric(url, "chatsmith_completion_tokens_total") - tokens_before < MAX_TOKENS  # it stopped early

    send(page, "What is 12*34?")  # the page is usable again, and the partial reply is part of the history
    wait_idle(page)
    messages = stored_messages(page)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 and messages[3]["content"] == partial
    assert messages[-1]["content"] == greedy(messages[:-1]).text
    posts = [r for r in page.requests if r[0] == "POST"]
    assert len(posts) == 3 and posts[-1][2]["messages"] == messages[:-1]

    # 3. reload: the conversation is in the sidebar and opens with all six messages
    page.reload()
    expect(page.locator(".conv-title")).to_have_text(["Hello there!"])
    page.locator(".conv-title").first.click()
    expect(page.locator(".msg")).to_have_count(6)
    expect(page.locator(".msg.user .body")).to_have_text(["Hello there!", "Count to ten, please.", "What is 12*34?"])
    assert stored_messages(page) == messages

    # 4. dark mode: the computed background changes, and stays after a reload
    light = page.evaluate(BG)
    page.click("#theme")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    dark = page.evaluate(BG)
    assert dark != light and light == "rgb(255, 255, 255)"
    page.reload()
    assert page.evaluate(BG) == dark
    page.locator(".conv-title").first.click()
    expect(page.locator(".msg")).to_have_count(6)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "ui-real.png")
    assert (ARTIFACTS / "ui-real.png").stat().st_size > 10_000


def test_hostile_model_output_from_the_real_server_renders_as_text(tok, serve, open_page):
    ids = tok.encode(XSS)
    assert tok.decode(ids) == XSS
    model = ScriptedModel(tok.vocab_size, lambda prompt: ids)
    server = Server(ServeConfig(slots=2, max_queue=2))
    server.start(Engine(model, tok, slots=2, max_len=1024), tok, "scripted")
    url = serve(server)
    page = open_page(url, "scripted")
    send(page, "Say something nasty.")
    expect(page.locator(".msg.assistant")).to_have_count(1)
    wait_idle(page)
    assert stored_messages(page)[-1] == {"role": "assistant", "content": XSS}  # the server streamed it whole
    body = page.locator(".msg.assistant .body").last
    expect(body).to_contain_text('<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>')
    expect(body).to_contain_text("[x](javascript:window.__xss=3)")  # shown, not linked
    expect(body.locator("strong")).to_have_text(["bold"])  # markdown still renders
    assert page.locator("#messages img, #messages script, #messages a").count() == 0
    page.reload()  # and again when rendered from storage
    page.locator(".conv-title").first.click()
    expect(page.locator(".msg.assistant .body").last).to_contain_text("onerror=")
    assert page.evaluate("window.__xss") is None


@pytest.mark.slow  # three replies of ~480 tokens from a 7.6M-parameter model, each also decoded by the reference
def test_first_message_and_a_long_conversation_on_a_cpu_shaped_model(serve, open_page):
    """Regression: on the cpu preset's model (context 512) the very first message got "Server error 400: ... the
    prompt has 30 tokens and max_tokens asks for 512 more": the page sent max_tokens 512 whatever the context. Now
    the page sends none (the server fits the reply into what the context leaves) and, as the conversation outgrows
    the context, leaves out the oldest exchanges so that a reply keeps a quarter of it. Random weights (a trained
    model is not hermetic): every reply runs to the end of the context, the hardest case for the next prompt."""
    cfg = bench_ref().resolve()  # the cpu preset's shape: 4 layers, width 256, vocab 8192, context 512
    model = GPT.build(cfg, device="cpu")
    _randomize(model, 0)
    tok = bench_tokenizer(cfg.vocab_size)
    run = run_dir("cpu-shaped")
    tok.save(run / "tokenizer")
    checkpoint.save(run / "chat" / "checkpoints", 1, model.state_dict(), meta={"config": {"model": asdict(cfg)}},
                    rng=False)
    server = Server(ServeConfig(slots=2, max_queue=2))
    load_into(server, LoadConfig(precision="fp32"))
    assert server.engine.max_len == 512
    url = serve(server)
    loaded = load_model(LoadConfig(run="cpu-shaped", precision="fp32"))
    reference = Engine(loaded.model, loaded.tokenizer, slots=1)

    page = open_page(url, "cpu-shaped")
    page.click("#open-settings")
    page.fill("[name=temperature]", "0")  # greedy, so each reply is checked exactly; max tokens left empty
    page.click("#settings button[value=close]")
    for k, text in enumerate(["What is 17 * 23?", "Tell me more about it.", "And what comes next?"]):
        send(page, text)
        wait_idle(page)  # no notice: no 400
        post = [r for r in page.requests if r[0] == "POST"][-1][2]
        assert "max_tokens" not in post and post["temperature"] == 0
        prompt = loaded.tokenizer.render_for_completion(post["messages"])
        assert len(prompt) + 512 // 4 <= 512  # the reply had room for a quarter of the context
        ref = reference.generate(prompt, dataclasses.replace(CHAT_DEFAULTS, temperature=0,
                                                             max_tokens=min(512, 512 - len(prompt))))
        stored = stored_messages(page)
        assert len(stored) == 2 * (k + 1) and stored[-1] == {"role": "assistant", "content": ref.text}
        if k:  # the first reply filled the context, so each later request leaves out what came before
            assert post["messages"] == [{"role": "user", "content": text}]
            expect(page.locator(".msg.assistant .note").last).to_contain_text("left out to fit the model's "
                                                                              "512-token context")
