/* chatsmith web chat: the page `chatsmith serve` shows at / (open http://127.0.0.1:8000/ after starting it).
 *
 * Plain modern JS, no build step, no CDN. It talks only to the OpenAI-compatible API of the origin that served it:
 * GET v1/models to fill the model list (and learn max_model_len, as vLLM reports it) and POST v1/chat/completions
 * with stream: true. Against `chatsmith serve` it also uses two optional endpoints, and works without them elsewhere:
 * - Tools: GET v1/tools lists the tools the server runs for the page (the calculator); they go into every request as
 *   `tools`, and a reply that ends in tool_calls has each call run with POST v1/tools/NAME, the result appended as a
 *   `tool` turn, and the reply continued (at most MAX_TOOL_CALLS calls, as `chatsmith chat`).
 * - Context: POST tokenize (vLLM's) counts the prompt; the oldest exchanges (a user message and the turns that answer
 *   it) are left out of the request until the prompt leaves room for min(max tokens, context / 4) tokens of reply,
 *   the rule of `chatsmith chat`; the stored conversation keeps them. Without that endpoint a 400
 *   context_length_exceeded leaves one more exchange out and tries again.
 * Sampling: fields left empty in Settings are not sent, so the server applies its defaults (for chatsmith: the same
 * as the terminal chat, shown as placeholders from v1/models); max_tokens is never sent unless set, and is capped at
 * what the context can hold.
 *
 * Storage: conversations, settings and the theme live in the browser's localStorage, not on the server. Why: the
 * server stays stateless (nothing to migrate, back up or secure, no accounts), the page works unchanged in front of
 * any OpenAI-compatible server, and chats stay private to this browser. Export/Import (JSON) moves them elsewhere.
 * The optional API key is kept there too, so use it only on a machine you trust.
 *
 * Safety: model output is untrusted. renderMarkdown() (markdown.js, loaded first) builds DOM nodes and sets text
 * through text nodes only; nothing here assigns HTML strings either.
 *
 * Streaming: fetch + ReadableStream with the SSE lines parsed by hand (EventSource cannot POST). The TextDecoder runs
 * in streaming mode so a Chinese character split across two network reads stays whole. Stop = AbortController.
 * Enter sends, except while an IME is composing (event.isComposing; keyCode 229 for Safari's late keydown).
 */
"use strict";

const KEYS = { convs: "chatsmith.conversations.v1", settings: "chatsmith.settings.v1", theme: "chatsmith.theme" };
const DEFAULTS = Object.freeze({ system: "", model: "", temperature: "", top_p: "", max_tokens: "", apiKey: "" });
const ROLES = new Set(["system", "user", "assistant", "tool"]);
const MAX_TOOL_CALLS = 4;
const REPLY_TOKENS = 512; // what a reply may use when Settings set no max tokens (the server's --max-tokens default)

// ---------------------------------------------------------------- storage

function loadJSON(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}

function validConversation(c) {
  return c && typeof c === "object" && Array.isArray(c.messages) &&
    c.messages.every((m) => m && ROLES.has(m.role) && typeof m.content === "string");
}

function normalize(c) { // a stored or imported conversation, with only the fields the app knows
  return {
    id: typeof c.id === "string" && c.id ? c.id : newId(),
    title: typeof c.title === "string" && c.title ? c.title : titleFrom(c.messages[0]?.content ?? ""),
    messages: c.messages.map((m) => ({
      role: m.role, content: m.content, ...(m.note ? { note: String(m.note) } : {}),
      ...(Array.isArray(m.tool_calls) && m.tool_calls.length ? { tool_calls: m.tool_calls.map(cleanCall) } : {}),
      ...(typeof m.tool_call_id === "string" ? { tool_call_id: m.tool_call_id } : {}),
      ...(typeof m.name === "string" ? { name: m.name } : {}),
    })),
    updated: Number(c.updated) || Date.now(),
  };
}

function cleanCall(c) { // an OpenAI tool call with string fields only
  const f = c?.function ?? {};
  return { id: String(c?.id ?? ""), type: "function", function: { name: String(f.name ?? ""),
    arguments: typeof f.arguments === "string" ? f.arguments : JSON.stringify(f.arguments ?? {}) } };
}

function exchangeStarts(messages) { // indexes where an exchange (a user message and the turns after it) begins
  return messages.map((m, i) => (m.role === "user" ? i : -1)).filter((i) => i >= 0);
}

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

function titleFrom(text) {
  const t = text.replace(/\s+/g, " ").trim();
  return t.length > 48 ? t.slice(0, 47) + "…" : t || "New chat";
}

// ---------------------------------------------------------------- SSE streaming client

async function apiError(res) { // an Error with the server's message and its OpenAI error code
  const text = await res.text().catch(() => "");
  let msg = "", code = null;
  try {
    const body = JSON.parse(text);
    msg = body?.error?.message ?? body?.detail ?? "";
    code = body?.error?.code ?? null;
    if (typeof msg !== "string") msg = JSON.stringify(msg);
  } catch { msg = text.slice(0, 300); }
  const hint = res.status === 401 ? " Set the API key in Settings." : "";
  const detail = (msg || res.statusText || "no details").trim().replace(/\.$/, "");
  return Object.assign(new Error(`Server error ${res.status}: ${detail}.${hint}`), { status: res.status, code });
}

async function* streamChat(url, headers, body, signal) {
  let res;
  try {
    res = await fetch(url, { method: "POST", headers, body: JSON.stringify(body), signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new Error(`Cannot reach the server at ${new URL(url).origin}. Is \`chatsmith serve\` running?`);
  }
  if (!res.ok) throw await apiError(res);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new Error("The connection to the server broke off in the middle of the reply.");
    }
    if (chunk.done) return;
    buf += decoder.decode(chunk.value, { stream: true });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).replace(/\r$/, "");
      buf = buf.slice(nl + 1);
      if (!line.startsWith("data:")) continue; // blank separators, ": keep-alive" comments, other fields
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      let event;
      try { event = JSON.parse(data); } catch { continue; }
      if (event.error) throw new Error(`Server error: ${event.error.message ?? JSON.stringify(event.error)}`);
      const choice = event.choices?.[0];
      if (choice) {
        yield { content: choice.delta?.content ?? "", finish: choice.finish_reason ?? null,
          toolCalls: Array.isArray(choice.delta?.tool_calls) ? choice.delta.tool_calls : [] };
      }
    }
  }
}

// ---------------------------------------------------------------- the app

function main() {
  const $ = (id) => document.getElementById(id);
  const ui = {
    list: $("conv-list"), messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"),
    title: $("title"), badge: $("model-badge"), notice: $("notice"), noticeText: $("notice-text"),
    dialog: $("settings"), form: $("settings-form"),
  };
  const darkQuery = window.matchMedia("(prefers-color-scheme: dark)");
  const state = {
    convs: [loadJSON(KEYS.convs, [])].flat().filter(validConversation).map(normalize),
    settings: { ...DEFAULTS, ...loadJSON(KEYS.settings, {}) },
    currentId: null, // null = a new chat, stored on its first message
    abort: null, // AbortController of the running generation
    maxLen: 0, // the model's context (max_model_len from v1/models); 0 = unknown
    tools: [], // tool definitions from v1/tools (empty when the server offers none)
    listing: Promise.resolve(), // the model/tool list fetch in flight (never rejects)
  };
  const api = (path) => new URL(path, document.baseURI).href; // relative: works behind a path prefix too

  const current = () => state.convs.find((c) => c.id === state.currentId) ?? null;
  const headers = () => ({
    "Content-Type": "application/json",
    ...(state.settings.apiKey ? { Authorization: `Bearer ${state.settings.apiKey}` } : {}),
  });

  function persist() {
    try {
      localStorage.setItem(KEYS.convs, JSON.stringify(state.convs));
    } catch {
      notify("Browser storage is full: export your conversations, then delete old ones.");
    }
  }

  function notify(text, kind = "error") {
    ui.noticeText.textContent = text;
    ui.notice.className = kind;
    ui.notice.hidden = false;
  }

  // ---- theme: follows prefers-color-scheme until the toggle is used, then remembered
  function applyTheme() {
    const stored = localStorage.getItem(KEYS.theme);
    const dark = stored ? stored === "dark" : darkQuery.matches;
    document.documentElement.dataset.theme = dark ? "dark" : "light";
  }

  // ---- sidebar
  function renderSidebar() {
    const items = [...state.convs].sort((a, b) => b.updated - a.updated).map((c) => {
      const open = button(c.title, () => select(c.id), "conv-title");
      open.title = c.title;
      const rename = button("✎", () => startRename(li, c), "icon-btn rename");
      const del = button("×", () => remove(c), "icon-btn delete");
      rename.setAttribute("aria-label", `Rename ${c.title}`);
      del.setAttribute("aria-label", `Delete ${c.title}`);
      const li = el("li", [open, rename, del], { class: c.id === state.currentId ? "conv active" : "conv" });
      return li;
    });
    ui.list.replaceChildren(...items);
  }

  function startRename(li, conv) {
    const field = el("input", [], { class: "rename-field", "aria-label": "Conversation name" });
    field.value = conv.title;
    let done = false;
    const finish = (save) => {
      if (done) return;
      done = true;
      if (save && field.value.trim()) {
        conv.title = field.value.trim().slice(0, 100);
        persist();
      }
      renderAll();
    };
    field.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.isComposing && e.keyCode !== 229) finish(true);
      if (e.key === "Escape") finish(false);
    });
    field.addEventListener("blur", () => finish(true));
    li.replaceChildren(field);
    field.focus();
    field.select();
  }

  function remove(conv) {
    if (!window.confirm(`Delete “${conv.title}”?`)) return;
    if (state.abort && state.abort.conv === conv) state.abort.abort();
    state.convs = state.convs.filter((c) => c !== conv);
    if (state.currentId === conv.id) state.currentId = null;
    persist();
    renderAll();
  }

  function select(id) {
    state.currentId = id;
    document.body.classList.remove("side-open");
    renderAll();
    ui.input.focus();
  }

  // ---- messages
  function renderMessages() {
    const conv = current();
    if (!conv || !conv.messages.length) {
      const model = state.settings.model || "the server's model";
      ui.messages.replaceChildren(el("div", [
        el("h2", ["What can I help with?"]),
        el("p", [`Replies stream from ${model}. Conversations stay in this browser.`]),
      ], { class: "empty" }));
      return;
    }
    ui.messages.replaceChildren(...conv.messages.map((m, i) => messageView(conv, m, i)));
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function messageView(conv, m, index) {
    const body = el("div", [], { class: "body" });
    if (m.role === "assistant") body.append(renderMarkdown(m.content));
    else body.textContent = m.content;
    for (const c of m.tool_calls ?? []) {
      body.append(el("div", [el("code", [`${c.function.name} ${c.function.arguments}`])], { class: "tool-call" }));
    }
    if (m.role === "tool") {
      body.replaceChildren(el("span", [`${m.name || "tool"} → `], { class: "muted" }), el("code", [m.content]));
      return el("div", [body], { class: "msg tool" });
    }
    const isLast = index === conv.messages.length - 1;
    const copy = button("Copy", () => copyText(m.content, copy));
    const actions = el("div", [copy], { class: "actions" });
    if (m.role === "user") actions.append(button("Edit", () => startEdit(view, conv, index)));
    if (isLast && m.role === "assistant") actions.append(button("Regenerate", () => regenerate(conv)));
    if (isLast && m.role === "user") actions.append(button("Retry", () => regenerate(conv)));
    const view = el("div", [body], { class: `msg ${m.role}` });
    if (m.note) view.append(el("div", [m.note], { class: "note" }));
    view.append(actions);
    return view;
  }

  function startEdit(view, conv, index) {
    if (state.abort) return;
    const area = el("textarea", [], { class: "edit", "aria-label": "Edit message" });
    area.value = conv.messages[index].content;
    const save = () => {
      const text = area.value.trim();
      if (!text) return;
      conv.messages.splice(index); // drops this message and everything after it
      conv.messages.push({ role: "user", content: text });
      if (index === 0) conv.title = titleFrom(text);
      generate(conv);
    };
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) { e.preventDefault(); save(); }
      if (e.key === "Escape") renderMessages();
    });
    view.replaceChildren(area, el("div", [
      button("Save & send", save, "btn small primary"), button("Cancel", renderMessages),
    ], { class: "actions" }));
    view.classList.add("editing");
    area.focus();
  }

  function regenerate(conv) {
    if (state.abort) return;
    while (conv.messages.length && conv.messages.at(-1).role !== "user") conv.messages.pop(); // with its tool turns
    generate(conv);
  }

  function renderAll() {
    const conv = current();
    ui.title.textContent = conv ? conv.title : "New chat";
    document.title = conv ? `${conv.title} · chatsmith` : "chatsmith";
    ui.badge.textContent = state.settings.model;
    renderSidebar();
    renderMessages();
  }

  function setBusy(busy) {
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    document.body.classList.toggle("busy", busy);
  }

  // ---- generation
  function apiMessages(messages) { // what the API takes: no notes or display names
    return messages.map((m) => ({
      role: m.role, content: m.content,
      ...(m.tool_calls ? { tool_calls: m.tool_calls } : {}), ...(m.tool_call_id ? { tool_call_id: m.tool_call_id } : {}),
    }));
  }

  function requestBody(conv, skip) { // `skip`: oldest exchanges left out to fit the context
    const s = state.settings;
    const num = (v) => (v === "" || v == null || !Number.isFinite(Number(v)) ? undefined : Number(v));
    const starts = exchangeStarts(conv.messages);
    let messages = apiMessages(conv.messages.slice(starts[Math.min(skip, starts.length - 1)] ?? 0));
    if (s.system.trim()) messages = [{ role: "system", content: s.system }, ...messages];
    let maxTokens = num(s.max_tokens);
    if (maxTokens !== undefined && state.maxLen) maxTokens = Math.max(1, Math.min(maxTokens, state.maxLen - 1));
    return {
      model: s.model || undefined, messages, stream: true, tools: state.tools.length ? state.tools : undefined,
      temperature: num(s.temperature), top_p: num(s.top_p), max_tokens: maxTokens,
    }; // JSON.stringify drops the undefined fields, so the server applies its defaults
  }

  async function promptTokens(body) { // the prompt's token count from the server's /tokenize, or null
    try {
      const res = await fetch(api("tokenize"), { method: "POST", headers: headers(),
        body: JSON.stringify({ model: body.model, messages: body.messages }) });
      const count = res.ok ? (await res.json()).count : null;
      return Number.isInteger(count) ? count : null;
    } catch { return null; }
  }

  async function fittingSkip(conv, skip) { // the fewest exchanges to leave out so a reply has room (chatsmith chat's rule)
    const exchanges = exchangeStarts(conv.messages).length;
    if (!state.maxLen) return skip;
    const wanted = Number(state.settings.max_tokens) || REPLY_TOKENS;
    const room = Math.min(wanted, Math.max(1, Math.floor(state.maxLen / 4)));
    for (; skip < exchanges - 1; skip++) {
      const count = await promptTokens(requestBody(conv, skip));
      if (count === null || count + room <= state.maxLen) break;
    }
    return skip;
  }

  async function runTool(call) { // POST v1/tools/NAME -> the tool turn's text (an error is text too, for the model)
    try {
      const res = await fetch(api(`v1/tools/${encodeURIComponent(call.function.name)}`), {
        method: "POST", headers: headers(), body: JSON.stringify({ arguments: call.function.arguments }) });
      if (!res.ok) return `error: ${(await apiError(res)).message}`;
      return String((await res.json()).content ?? "");
    } catch { return "error: the server could not run the tool"; }
  }

  async function generate(conv) {
    ui.notice.hidden = true;
    const ctrl = new AbortController();
    ctrl.conv = conv;
    state.abort = ctrl;
    setBusy(true);
    let skip = 0, calls = 0, reply = null, timer = null;
    try {
      await state.listing; // a message sent before the model and tool lists arrived waits for them
      for (;;) {
        skip = await fittingSkip(conv, skip);
        const body = requestBody(conv, skip);
        reply = { role: "assistant", content: "" };
        const left = skip ? `The ${skip} oldest exchange${skip > 1 ? "s were" : " was"} left out to fit the ` +
          `model's ${state.maxLen || "limited"}-token context. ` : "";
        if (left) reply.note = left.trim();
        conv.messages.push(reply);
        conv.updated = Date.now();
        persist();
        renderAll();
        const view = ui.messages.lastElementChild;
        view.classList.add("streaming");
        const target = view.querySelector(".body");
        const paint = () => {
          timer = null;
          if (!view.isConnected) return; // the user switched conversations; the reply is still collected
          const stick = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 80;
          target.replaceChildren(renderMarkdown(reply.content));
          if (stick) ui.messages.scrollTop = ui.messages.scrollHeight;
        };
        const toolCalls = [];
        let finish = null;
        try {
          for await (const chunk of streamChat(api("v1/chat/completions"), headers(), body, ctrl.signal)) {
            reply.content += chunk.content;
            finish = chunk.finish ?? finish;
            for (const part of chunk.toolCalls) { // OpenAI streams a call in pieces by index; chatsmith sends it whole
              const c = (toolCalls[part.index ?? 0] ??= { id: "", type: "function", function: { name: "", arguments: "" } });
              c.id = part.id ?? c.id;
              c.function.name += part.function?.name ?? "";
              c.function.arguments += part.function?.arguments ?? "";
            }
            if (finish === "length") reply.note = `${left}Cut off at the max tokens limit (see Settings).`;
            timer ??= setTimeout(paint, 30);
          }
        } catch (err) {
          const starts = exchangeStarts(conv.messages).length;
          if (err.code === "context_length_exceeded" && !reply.content && skip < starts - 1) {
            conv.messages.splice(conv.messages.indexOf(reply), 1);
            skip++;
            continue;
          }
          throw err;
        } finally {
          clearTimeout(timer);
          timer = null;
        }
        if (finish !== "tool_calls" || !toolCalls.length) break;
        reply.tool_calls = toolCalls.map(cleanCall);
        if (calls >= MAX_TOOL_CALLS) {
          reply.note = `Stopped: the reply asked for more than ${MAX_TOOL_CALLS} tool calls.`;
          break;
        }
        for (const call of reply.tool_calls) {
          calls++;
          conv.messages.push({ role: "tool", tool_call_id: call.id, name: call.function.name,
            content: await runTool(call) });
        }
        persist();
      }
    } catch (err) {
      if (err.name === "AbortError") { if (reply) reply.note = "Stopped."; } else notify(err.message);
    } finally {
      clearTimeout(timer);
      if (reply && !reply.content && !reply.tool_calls) conv.messages.splice(conv.messages.indexOf(reply), 1);
      state.abort = null;
      setBusy(false);
      persist();
      renderAll();
    }
  }

  function send() {
    const text = ui.input.value.trim();
    if (!text || state.abort) return;
    let conv = current();
    if (!conv) {
      conv = { id: newId(), title: titleFrom(text), messages: [], updated: Date.now() };
      state.convs.push(conv);
      state.currentId = conv.id;
    }
    conv.messages.push({ role: "user", content: text });
    ui.input.value = "";
    autosize();
    generate(conv);
  }

  function autosize() {
    ui.input.style.height = "auto";
    ui.input.style.height = `${Math.min(ui.input.scrollHeight, 220)}px`;
  }

  // ---- settings and models
  function fillSettingsForm() {
    for (const [k, v] of Object.entries(state.settings)) {
      if (ui.form.elements[k]) ui.form.elements[k].value = v;
    }
  }

  function loadModels() { // state.listing: the fetch of the model and tool lists, awaited before generating
    state.listing = fetchListing();
    return state.listing;
  }

  async function fetchListing() {
    const select = ui.form.elements.model;
    try {
      let res;
      try {
        res = await fetch(api("v1/models"), { headers: headers() });
      } catch {
        throw new Error(`Cannot reach the server at ${location.origin}. Is \`chatsmith serve\` running?`);
      }
      if (!res.ok) throw await apiError(res);
      const models = (await res.json()).data ?? [];
      const ids = models.map((m) => String(m.id));
      select.replaceChildren(...ids.map((id) => el("option", [id], { value: id })));
      if (!ids.includes(state.settings.model)) state.settings.model = ids[0] ?? "";
      select.value = state.settings.model;
      const card = models.find((m) => String(m.id) === state.settings.model) ?? {};
      state.maxLen = Number.isInteger(card.max_model_len) && card.max_model_len > 1 ? card.max_model_len : 0;
      const form = ui.form.elements;
      form.max_tokens.placeholder = state.maxLen ? `auto (fits the ${state.maxLen}-token context)` : "server default";
      for (const k of ["temperature", "top_p"]) {
        const v = card.sampling_defaults?.[k];
        form[k].placeholder = typeof v === "number" ? `${v} (server default)` : "server default";
      }
      renderAll();
    } catch (err) {
      notify(`Could not list models. ${err.message}`);
    }
    try { // optional: a server without v1/tools gets no tools
      const res = await fetch(api("v1/tools"), { headers: headers() });
      const data = res.ok ? (await res.json()).data : [];
      state.tools = Array.isArray(data) ? data.filter((t) => t?.type === "function" && t.function?.name) : [];
    } catch { state.tools = []; }
  }

  function saveSettings() {
    localStorage.setItem(KEYS.settings, JSON.stringify(state.settings));
    ui.badge.textContent = state.settings.model;
  }

  // ---- import / export
  function exportAll() {
    const data = { format: "chatsmith-conversations", version: 1, conversations: state.convs };
    const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
    const link = el("a", [], { href: URL.createObjectURL(blob), download: "chatsmith-conversations.json" });
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }

  async function importFile(file) {
    let data;
    try { data = JSON.parse(await file.text()); } catch {
      notify(`${file.name} is not JSON: choose a file made by Export.`);
      return;
    }
    const list = Array.isArray(data) ? data : data?.conversations;
    const good = Array.isArray(list) ? list.filter(validConversation) : [];
    if (!good.length) {
      notify(`${file.name} holds no conversations: choose a file made by Export.`);
      return;
    }
    for (const conv of good.map(normalize)) {
      state.convs = state.convs.filter((x) => x.id !== conv.id).concat(conv); // same id: the import replaces it
    }
    persist();
    renderAll();
    notify(`Imported ${good.length} conversation${good.length > 1 ? "s" : ""}.`, "info");
  }

  // ---- wiring
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.input.addEventListener("input", autosize);
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) { e.preventDefault(); send(); }
  });
  ui.stop.addEventListener("click", () => state.abort?.abort());
  $("new-chat").addEventListener("click", () => select(null));
  $("menu").addEventListener("click", () => document.body.classList.toggle("side-open"));
  $("scrim").addEventListener("click", () => document.body.classList.remove("side-open"));
  $("notice-close").addEventListener("click", () => { ui.notice.hidden = true; });
  $("export").addEventListener("click", exportAll);
  $("import").addEventListener("change", (e) => {
    if (e.target.files[0]) importFile(e.target.files[0]);
    e.target.value = "";
  });
  $("theme").addEventListener("click", () => {
    localStorage.setItem(KEYS.theme, document.documentElement.dataset.theme === "dark" ? "light" : "dark");
    applyTheme();
  });
  darkQuery.addEventListener("change", applyTheme);
  let keyAtOpen = ""; // the model list is fetched again when the API key changed
  $("open-settings").addEventListener("click", () => {
    keyAtOpen = state.settings.apiKey;
    fillSettingsForm();
    ui.dialog.showModal();
  });
  ui.dialog.addEventListener("close", () => { if (state.settings.apiKey !== keyAtOpen) loadModels(); });
  ui.form.addEventListener("input", (e) => {
    if (e.target.name in DEFAULTS) state.settings[e.target.name] = e.target.value;
    saveSettings();
  });
  $("reset-settings").addEventListener("click", () => {
    state.settings = { ...DEFAULTS, model: state.settings.model, apiKey: state.settings.apiKey };
    fillSettingsForm();
    saveSettings();
  });

  applyTheme();
  renderAll();
  loadModels();
  ui.input.focus();
}

main();
