"""The web chat (chatsmith/ui/) driven in headless Debian chromium through Playwright's sync API.

    python -m pytest -q tests/test_ui.py        # screenshots land in artifacts/ui*.png

The page talks to a small fake OpenAI-compatible backend defined here (FastAPI + uvicorn on a free loopback port in a
thread) that serves chatsmith/ui/ at / and streams scripted replies word by word. The script is chosen by a tag in the
last user message: [gate] holds the stream open until the test releases it (so "text appears before the stream ends"
is checked, not assumed), [slow] streams for seconds (stop), [xss] sends hostile HTML and markdown, [400] answers with
an OpenAI error body, [zh] sends Chinese with one character split across two network writes, [tool] answers with a
calculator tool call (and the turn after the tool result with the result). Like `chatsmith serve` it reports
max_model_len, lists a calculator on /v1/tools and counts tokens on /tokenize (100 per user message). Every request
body and Authorization header is recorded, so the tests check what the page actually sent.

Playwright's own browser download fails here, so the test launches /usr/bin/chromium; it skips (with the reason) when
playwright, fastapi/uvicorn or chromium is missing.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
fastapi = pytest.importorskip("fastapi", reason="fastapi is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed")
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402

expect = sync_api.expect
ROOT = Path(__file__).resolve().parents[1]
UI_DIR = ROOT / "chatsmith" / "ui"
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
MARKDOWN = ("Some **bold**, *italic*, `inline <code>` and [a link](https://example.com/docs) "
            "but [no link](javascript:window.__xss=3).\n\n"
            "```python\nprint('<b>hi</b>')\n```\n\n- one\n- two\n")
CHINESE = "你好！我是一个小模型，很高兴认识你。"

if CHROMIUM is None:
    pytest.skip("Debian chromium is not installed (apt-get install chromium)", allow_module_level=True)


# ---------------------------------------------------------------- the fake OpenAI-compatible backend

def sse(delta: dict, finish: str | None = None) -> str:
    chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake-model",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


CALCULATOR = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                               "parameters": {"type": "object"}}}
CONTEXT = 512  # the fake model's max_model_len; /tokenize counts 100 tokens per user message


def make_backend() -> SimpleNamespace:
    state = SimpleNamespace(requests=[], gate=threading.Event(), finished=threading.Event(),
                            slow_sent=0, slow_closed=threading.Event(), tool_runs=[], tokenized=[])
    app = fastapi.FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [
            {"id": "fake-model", "object": "model", "max_model_len": CONTEXT,
             "sampling_defaults": {"temperature": 0.6, "top_p": 0.95}}, {"id": "other-model"}]}

    @app.get("/v1/tools")
    def tools():
        return {"object": "list", "data": [CALCULATOR]}

    @app.post("/v1/tools/{name}")
    async def run_tool(name: str, request: fastapi.Request):
        state.tool_runs.append((name, (await request.json())["arguments"]))
        return {"content": "391"}

    @app.post("/tokenize")
    async def tokenize(request: fastapi.Request):
        messages = (await request.json())["messages"]
        state.tokenized.append(messages)
        return {"count": 100 * sum(m["role"] == "user" for m in messages), "max_model_len": CONTEXT}

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request):
        body = await request.json()
        state.requests.append({"body": body, "auth": request.headers.get("authorization")})
        last = body["messages"][-1]["content"]
        n = len(state.requests)
        if "[400]" in last:
            return JSONResponse(status_code=400, content={"error": {
                "message": "temperature must be between 0 and 2", "type": "invalid_request_error",
                "param": "temperature", "code": None}})

        async def stream():
            state.finished.clear()
            yield sse({"role": "assistant", "content": ""})
            if body["messages"][-1]["role"] == "tool":
                yield sse({"content": f"The answer is {last}."})
            elif "[tool]" in last:
                yield sse({"content": "Let me compute."})
                yield sse({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {
                    "name": "calculator", "arguments": '{"expression": "17 * 23"}'}}]}, "tool_calls")
                yield "data: [DONE]\n\n"  # one finish_reason per choice, as the API sends it
                state.finished.set()
                return
            elif "[gate]" in last:
                for word in ["Hello ", "there, ", "streaming "]:
                    yield sse({"content": word})
                deadline = time.monotonic() + 15
                while not state.gate.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                yield ": keep-alive\n\n"
                yield sse({"content": "world. Done."})
            elif "[slow]" in last:
                try:
                    for i in range(200):
                        state.slow_sent = i + 1
                        yield sse({"content": f"w{i} "})
                        await asyncio.sleep(0.05)
                finally:
                    state.slow_closed.set()
            elif "[zh]" in last:
                raw = sse({"content": CHINESE}).encode()
                cut = raw.index("小".encode()) + 1  # in the middle of a 3-byte character
                yield raw[:cut]
                await asyncio.sleep(0.15)
                yield raw[cut:]
            else:
                text = XSS + "\n\n" + MARKDOWN if "[xss]" in last else f"Reply {n} to: {last}"
                for word in re.findall(r"\S+\s*|\s+", text):
                    yield sse({"content": word})
                    await asyncio.sleep(0.005)
            yield sse({}, "stop")
            yield 'data: {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [], "usage": {}}\n\n'
            yield "data: [DONE]\n\n"
            state.finished.set()

        return StreamingResponse(stream(), media_type="text/event-stream")

    app.mount("/", StaticFiles(directory=UI_DIR, html=True))
    state.app = app
    return state


@pytest.fixture(scope="module")
def server():
    backend = make_backend()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(backend.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started, "the fake backend did not start"
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", backend=backend)
    srv.should_exit = True
    thread.join(5)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def open_page(browser, server):
    """open_page(**context_options) -> a fresh page (own localStorage) at the UI; fails the test on any JS error."""
    contexts, errors = [], []
    server.backend.requests.clear()
    server.backend.gate.clear()

    def _open(routes=None, **options):
        options = {"viewport": {"width": 1200, "height": 760}, "color_scheme": "light", **options}
        ctx = browser.new_context(**options)
        ctx.set_default_timeout(20_000)  # a busy 2-core machine can be slow
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda err: errors.append(err))
        for pattern, handler in (routes or {}).items():  # set before the page loads
            page.route(pattern, handler)
        page.goto(server.url)
        expect(page.locator("#model-badge")).to_have_text("fake-model")  # /v1/models answered
        return page

    yield _open
    for ctx in contexts:
        ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_idle(page) -> None:
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator(".msg.streaming")).to_have_count(0)


# ---------------------------------------------------------------- tests

def test_reply_streams_in_before_the_stream_ends(open_page, server):
    page = open_page()
    send(page, "hello [gate]")
    reply = page.locator(".msg.assistant .body").last
    expect(reply).to_contain_text("Hello there, streaming")  # the server is still holding the stream open
    assert not server.backend.finished.is_set()
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#send")).to_be_hidden()
    server.backend.gate.set()
    expect(reply).to_have_text("Hello there, streaming world. Done.")
    wait_idle(page)
    body = server.backend.requests[-1]["body"]
    assert body["stream"] is True and body["model"] == "fake-model"
    assert body["messages"] == [{"role": "user", "content": "hello [gate]"}]
    expect(page.locator("#title")).to_have_text("hello [gate]")


def test_stop_keeps_the_partial_reply_and_cancels_the_request(open_page, server):
    page = open_page()
    server.backend.slow_closed.clear()
    send(page, "count [slow]")
    reply = page.locator(".msg.assistant .body").last
    expect(reply).to_contain_text("w3")
    page.click("#stop")
    wait_idle(page)
    assert server.backend.slow_closed.wait(3), "the server kept streaming after Stop: the fetch was not aborted"
    partial = reply.inner_text()
    time.sleep(0.3)
    assert reply.inner_text() == partial and "w199" not in partial
    assert re.fullmatch(r"(w\d+ ?)+", partial.strip())
    expect(page.locator(".msg.assistant .note")).to_have_text("Stopped.")
    send(page, "still there?")  # the UI is usable again, and the partial reply is part of the history
    expect(page.locator(".msg.assistant .body").last).to_contain_text("to: still there?")
    sent = server.backend.requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"] and sent[1]["content"].strip() == partial.strip()


def test_conversations_survive_reload_rename_and_delete(open_page):
    page = open_page()
    send(page, "remember me")
    wait_idle(page)
    page.click("#new-chat")
    send(page, "second chat")
    wait_idle(page)
    page.reload()
    titles = page.locator(".conv-title")
    expect(titles).to_have_text(["second chat", "remember me"])  # newest first
    titles.filter(has_text="remember me").click()
    expect(page.locator(".msg.user .body")).to_have_text(["remember me"])
    expect(page.locator(".msg.assistant .body")).to_contain_text(["to: remember me"])

    page.locator(".conv.active .rename").click()
    page.fill(".rename-field", "重命名的对话")
    page.press(".rename-field", "Enter")
    page.reload()
    expect(titles).to_have_text(["second chat", "重命名的对话"])

    page.once("dialog", lambda d: d.accept())
    page.locator(".conv", has_text="second chat").hover()
    page.locator(".conv", has_text="second chat").locator(".delete").click()
    expect(titles).to_have_text(["重命名的对话"])
    page.reload()
    expect(titles).to_have_text(["重命名的对话"])


def test_dark_mode_toggle_is_remembered_and_follows_the_system_by_default(open_page):
    page = open_page(color_scheme="light")
    bg = "getComputedStyle(document.body).backgroundColor"
    assert page.evaluate("document.documentElement.dataset.theme") == "light"
    assert page.evaluate(bg) == "rgb(255, 255, 255)"
    page.click("#theme")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    assert page.evaluate(bg) == "rgb(22, 24, 29)"
    page.reload()
    assert page.evaluate(bg) == "rgb(22, 24, 29)"

    dark_system = open_page(color_scheme="dark")  # no stored choice: follow prefers-color-scheme
    assert dark_system.evaluate("document.documentElement.dataset.theme") == "dark"
    assert dark_system.evaluate(bg) == "rgb(22, 24, 29)"


def test_hostile_model_output_renders_as_text_and_markdown_is_safe(open_page):
    page = open_page()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    send(page, "attack [xss]")
    wait_idle(page)
    body = page.locator(".msg.assistant .body").last
    expect(body).to_contain_text(XSS)  # the literal string is visible
    assert page.evaluate("window.__xss") is None
    assert page.locator("#messages img, #messages script").count() == 0
    expect(body.locator("strong")).to_have_text(["bold"])
    expect(body.locator("em")).to_have_text(["italic"])
    expect(body.locator("p code")).to_have_text(["inline <code>"])
    links = body.locator("a")
    expect(links).to_have_count(1)
    expect(links).to_have_attribute("href", "https://example.com/docs")
    expect(links).to_have_attribute("rel", re.compile("noopener"))
    expect(body).to_contain_text("[no link](javascript:window.__xss=3)")  # shown, not linked
    expect(body.locator("pre code")).to_have_text("print('<b>hi</b>')")
    expect(body.locator("li")).to_have_text(["one", "two"])
    body.locator(".code .btn").click()
    assert page.evaluate("navigator.clipboard.readText()") == "print('<b>hi</b>')"
    page.locator(".msg.assistant .actions .btn", has_text="Copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == XSS + "\n\n" + MARKDOWN
    page.reload()  # and again when rendered from storage
    page.locator(".conv-title").first.click()
    expect(page.locator(".msg.assistant .body").last).to_contain_text(XSS)
    assert page.evaluate("window.__xss") is None


LINK = 'target="_blank" rel="noopener noreferrer"'
COPY = '<button type="button" class="btn small ghost">Copy</button>'
MARKDOWN_CASES = [  # source -> the DOM renderMarkdown builds, serialized by the browser
    ("# Title\ntext", "<h3>Title</h3><p>text</p>"),
    ("3. three\n4. four\nafter", '<ol start="3"><li>three</li><li>four</li></ol><p>after</p>'),
    ("- a\n  continued\n- b", "<ul><li>a<br>continued</li><li>b</li></ul>"),
    ("> quoted **b**\n> more", "<blockquote><p>quoted <strong>b</strong><br>more</p></blockquote>"),
    ("line1\nline2\n\npara2", "<p>line1<br>line2</p><p>para2</p>"),
    ("```js\nlet a = 1;", f'<div class="code"><div class="code-head"><span>js</span>{COPY}</div>'
                         "<pre><code>let a = 1;</code></pre></div>"),  # unclosed fence while streaming
    ("~~~\ncode ~~~ still\n~~~\nafter", f'<div class="code"><div class="code-head"><span>code</span>{COPY}</div>'
                                         "<pre><code>code ~~~ still</code></pre></div><p>after</p>"),
    ("**not closed", "<p>**not closed</p>"),
    ("snake_case_name and _it_", "<p>snake_case_name and <em>it</em></p>"),
    ("`<b>` & <i>", "<p><code>&lt;b&gt;</code> &amp; &lt;i&gt;</p>"),
    ("[x](javascript:alert(1)) [y](data:text/html,hi)", "<p>[x](javascript:alert(1)) [y](data:text/html,hi)</p>"),
    ("[t](https://a.com/x?q=1&r=2)", f'<p><a href="https://a.com/x?q=1&amp;r=2" {LINK}>t</a></p>'),
    ("see https://example.com/a_b. end", f'<p>see <a href="https://example.com/a_b" {LINK}>https://example.com/a_b</a>'
                                         ". end</p>"),
    ("网址https://example.com/路径，好的", f'<p>网址<a href="https://example.com/%E8%B7%AF%E5%BE%84" {LINK}>'
                                      "https://example.com/路径</a>，好的</p>"),
]


def test_markdown_renderer_cases(open_page):
    page = open_page()
    got = page.evaluate("""cases => cases.map(src => {
        const box = document.createElement('div');
        box.append(renderMarkdown(src));
        return box.innerHTML;  // serialization for the comparison only
    })""", [src for src, _ in MARKDOWN_CASES])
    for (src, want), have in zip(MARKDOWN_CASES, got):
        assert have == want, src


def test_app_js_never_assigns_html_strings():
    source = (UI_DIR / "app.js").read_text() + (UI_DIR / "markdown.js").read_text()
    for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"]:
        assert sink not in source, sink
    html = (UI_DIR / "index.html").read_text() + (UI_DIR / "style.css").read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", html) and "@import" not in html  # no CDN


def test_unreachable_server_shows_a_clear_error_and_retry_recovers(open_page, server):
    page = open_page()
    page.route("**/v1/**", lambda route: route.abort("connectionrefused"))
    send(page, "anyone there?")
    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text(f"Cannot reach the server at {server.url.rstrip('/')}")
    expect(page.locator(".msg.user .body")).to_have_text(["anyone there?"])  # the message is kept
    expect(page.locator(".msg.assistant")).to_have_count(0)
    page.unroute("**/v1/**")
    page.locator(".msg.user .btn", has_text="Retry").click()
    expect(page.locator(".msg.assistant .body")).to_contain_text("to: anyone there?")
    expect(notice).to_be_hidden()


def test_error_body_message_is_shown(open_page):
    page = open_page()
    send(page, "bad request [400]")
    expect(page.locator("#notice-text")).to_have_text("Server error 400: temperature must be between 0 and 2.")
    wait_idle(page)
    expect(page.locator(".msg.assistant")).to_have_count(0)


def test_settings_reach_the_request_and_persist(open_page, server):
    page = open_page()
    page.click("#open-settings")
    page.fill("[name=system]", "Be brief.")
    page.fill("[name=temperature]", "0.2")
    page.fill("[name=max_tokens]", "64")
    page.select_option("[name=model]", "other-model")
    page.fill("[name=apiKey]", "sk-test")
    page.click("#settings button[value=close]")
    expect(page.locator("#settings")).to_be_hidden()
    send(page, "hi")
    wait_idle(page)
    sent = server.backend.requests[-1]
    assert sent["auth"] == "Bearer sk-test"
    body = sent["body"]
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (body["temperature"], body["max_tokens"], body["model"]) == (0.2, 64, "other-model")
    assert "top_p" not in body  # left empty: the server's default
    page.reload()
    expect(page.locator("#model-badge")).to_have_text("other-model")
    page.click("#open-settings")
    expect(page.locator("[name=system]")).to_have_value("Be brief.")


def test_defaults_are_the_servers_and_tools_are_sent(open_page, server):
    """Regression: the page sent max_tokens 512 whatever the context (a 400 on the first message of a 512-token
    model), temperature 0.7 and top_p 1 (not the terminal chat's defaults) and no tools."""
    page = open_page()
    send(page, "hi")
    wait_idle(page)
    body = server.backend.requests[-1]["body"]
    assert not {"max_tokens", "temperature", "top_p"} & set(body)  # the server applies its own defaults
    assert body["tools"] == [CALCULATOR]
    page.click("#open-settings")
    expect(page.locator("[name=temperature]")).to_have_attribute("placeholder", "0.6 (server default)")
    expect(page.locator("[name=max_tokens]")).to_have_attribute("placeholder",
                                                                f"auto (fits the {CONTEXT}-token context)")
    page.fill("[name=max_tokens]", "5000")  # more than the context: capped, never an impossible request
    page.click("#settings button[value=close]")
    send(page, "again")
    wait_idle(page)
    assert server.backend.requests[-1]["body"]["max_tokens"] == CONTEXT - 1


def test_a_message_sent_before_the_tool_list_arrived_waits_for_it(open_page, server):
    """Regression: a first message typed while GET v1/tools was still in flight went out without tools."""
    held = []  # the tool list's request, held back until released below
    page = open_page(routes={"**/v1/tools": lambda route: held.append(route)})
    send(page, "hi")
    page.wait_for_timeout(300)
    assert not any(r["body"].get("messages") for r in server.backend.requests)  # nothing sent while waiting
    assert held, "the page never asked for v1/tools"
    held[0].continue_()
    wait_idle(page)
    assert server.backend.requests[-1]["body"]["tools"] == [CALCULATOR]


def test_a_tool_call_runs_on_the_server_and_the_reply_goes_on(open_page, server):
    """Regression: calculator calls the model was trained to make showed up as raw <tool_call> text."""
    page = open_page()
    server.backend.tool_runs.clear()
    send(page, "What is 17 * 23? [tool]")
    expect(page.locator(".msg.assistant .body").last).to_have_text("The answer is 391.")
    wait_idle(page)
    assert server.backend.tool_runs == [("calculator", '{"expression": "17 * 23"}')]
    call = {"id": "call_1", "type": "function",
            "function": {"name": "calculator", "arguments": '{"expression": "17 * 23"}'}}
    assert server.backend.requests[-1]["body"]["messages"] == [
        {"role": "user", "content": "What is 17 * 23? [tool]"},
        {"role": "assistant", "content": "Let me compute.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "391"}]
    expect(page.locator(".msg.tool")).to_have_text("calculator → 391")
    expect(page.locator(".tool-call")).to_have_text('calculator {"expression": "17 * 23"}')
    assert "<tool_call>" not in page.locator("#messages").inner_text()
    page.reload()  # stored with its tool turns
    page.locator(".conv-title").first.click()
    expect(page.locator(".msg")).to_have_count(4)
    expect(page.locator(".msg.tool")).to_have_text("calculator → 391")


def test_a_long_conversation_leaves_out_the_oldest_exchanges(open_page, server):
    """The prompt must leave min(max tokens, context / 4) = 128 tokens for the reply: with /tokenize counting 100
    per user message, at most 3 exchanges fit in 512 tokens; the stored conversation keeps all of them."""
    page = open_page()
    for k in range(5):
        send(page, f"message {k}")
        wait_idle(page)
    sent = server.backend.requests[-1]["body"]["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == ["message 2", "message 3", "message 4"]
    assert sent[0] == {"role": "user", "content": "message 2"}  # whole exchanges, from a user message on
    expect(page.locator(".msg.user")).to_have_count(5)
    expect(page.locator(".msg.assistant .note").last).to_have_text(
        "The 2 oldest exchanges were left out to fit the model's 512-token context.")


def test_regenerate_and_edit_drop_what_followed(open_page, server):
    page = open_page()
    send(page, "first")
    wait_idle(page)
    replies = page.locator(".msg.assistant .body")
    before = replies.last.inner_text()
    page.locator(".msg.assistant .btn", has_text="Regenerate").click()
    wait_idle(page)
    expect(replies).to_have_count(1)
    assert replies.last.inner_text() != before
    assert server.backend.requests[-1]["body"]["messages"] == [{"role": "user", "content": "first"}]

    send(page, "second")
    wait_idle(page)
    expect(page.locator(".msg")).to_have_count(4)
    page.locator(".msg.user").first.locator(".btn", has_text="Edit").click()
    page.fill("textarea.edit", "first, edited")
    page.click("text=Save & send")
    wait_idle(page)
    expect(page.locator(".msg.user .body")).to_have_text(["first, edited"])
    expect(replies).to_have_count(1)
    expect(replies.last).to_contain_text("to: first, edited")
    assert server.backend.requests[-1]["body"]["messages"] == [{"role": "user", "content": "first, edited"}]


def test_chinese_ime_enter_does_not_send_and_split_utf8_streams_whole(open_page, server):
    page = open_page()
    page.focus("#input")
    page.keyboard.insert_text("你好，世界 [zh]")
    count = len(server.backend.requests)
    page.evaluate("""document.getElementById('input').dispatchEvent(new KeyboardEvent('keydown',
        {key: 'Enter', code: 'Enter', bubbles: true, cancelable: true, isComposing: true}))""")
    time.sleep(0.2)
    assert len(server.backend.requests) == count  # Enter that confirms an IME candidate must not send
    expect(page.locator("#input")).to_have_value("你好，世界 [zh]")
    page.press("#input", "Enter")
    wait_idle(page)
    expect(page.locator(".msg.assistant .body")).to_have_text([CHINESE])  # no U+FFFD from the split character
    expect(page.locator(".conv-title")).to_have_text(["你好，世界 [zh]"])


def test_export_then_import_restores_conversations(open_page, tmp_path):
    page = open_page()
    send(page, "keep this")
    wait_idle(page)
    with page.expect_download() as download:
        page.click("#export")
    path = tmp_path / "export.json"
    download.value.save_as(path)
    data = json.loads(path.read_text())
    [conv] = data["conversations"]
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert conv["messages"][0]["content"] == "keep this"

    page.once("dialog", lambda d: d.accept())
    page.locator(".conv.active .delete").click()
    expect(page.locator(".conv")).to_have_count(0)
    page.set_input_files("#import", str(path))
    expect(page.locator("#notice-text")).to_have_text("Imported 1 conversation.")
    expect(page.locator(".conv-title")).to_have_text(["keep this"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"conversations": [{"messages": [{"role": "robot", "content": 1}]}]}')
    page.set_input_files("#import", str(bad))
    expect(page.locator("#notice")).to_contain_text("holds no conversations")
    expect(page.locator(".conv")).to_have_count(1)


def test_screenshots_desktop_and_phone(open_page):
    ARTIFACTS.mkdir(exist_ok=True)
    page = open_page()
    send(page, "Show me some markdown [xss]")
    wait_idle(page)
    page.click("#new-chat")
    send(page, "你好 [zh]")
    wait_idle(page)
    page.locator(".conv-title", has_text="markdown").click()
    page.screenshot(path=ARTIFACTS / "ui.png")
    page.click("#open-settings")
    page.screenshot(path=ARTIFACTS / "ui-settings.png")
    page.keyboard.press("Escape")

    phone = open_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True,
                      color_scheme="dark")
    sidebar = phone.locator("#sidebar")
    assert sidebar.bounding_box()["x"] + sidebar.bounding_box()["width"] <= 0  # collapsed off-screen
    send(phone, "A phone-sized question [xss]")
    wait_idle(phone)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # nothing overflows sideways
    phone.screenshot(path=ARTIFACTS / "ui-phone.png")
    phone.click("#menu")
    expect(phone.locator(".conv-title")).to_be_in_viewport()
    phone.wait_for_timeout(300)  # the slide-in transition
    phone.screenshot(path=ARTIFACTS / "ui-phone-sidebar.png")
    phone.mouse.click(370, 400)  # the scrim closes the drawer
    phone.wait_for_timeout(300)
    assert sidebar.bounding_box()["x"] + sidebar.bounding_box()["width"] <= 0
