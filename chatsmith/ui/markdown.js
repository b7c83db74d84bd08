/* chatsmith web chat: DOM helpers and the markdown renderer, loaded before app.js (a plain script: these functions
 * are globals of the page; no build step, no CDN).
 *
 * Safety: model output is untrusted. renderMarkdown() builds DOM nodes and sets text through text nodes only, plus
 * a few fixed attributes (links: http/https only, rel=noopener noreferrer). Nothing here assigns HTML strings.
 */
"use strict";

// ---------------------------------------------------------------- small DOM helpers (no HTML strings anywhere)

function el(tag, children = [], attrs = {}) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children); // strings become text nodes
  return node;
}

function button(label, onClick, cls = "btn small") {
  const b = el("button", [label], { type: "button", class: cls });
  b.addEventListener("click", onClick);
  return b;
}

async function copyText(text, btn) {
  try {
    await navigator.clipboard.writeText(text);
  } catch { // clipboard API needs a secure context; plain http on a LAN address falls back to execCommand
    const area = el("textarea", [], { style: "position:fixed;opacity:0" });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const old = btn.textContent;
  btn.textContent = "Copied";
  setTimeout(() => { btn.textContent = old; }, 1200);
}

// ---------------------------------------------------------------- markdown: a small, safe subset

const LIST_RE = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
const FENCE_RE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/;
const INLINE_RE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1,2: `code`
  /\[([^\]\n]+)\]\(([^()\s]+)\)/.source, // 3,4: [text](url)
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 5: **bold**
  /(?<![\p{L}\p{N}_])__(?=\S)([\s\S]*?\S)__(?![\p{L}\p{N}_])/.source, // 6: __bold__ (not inside words)
  /\*(?=[^\s*])([^*]*?[^\s*])\*/.source, // 7: *italic*
  /(?<![\p{L}\p{N}_])_(?=[^\s_])([^_]*?[^\s_])_(?![\p{L}\p{N}_])/.source, // 8: _italic_
  /(https?:\/\/[^\s<>()，。！？；：、（）「」]*[^\s<>().,;:!?'"，。！？；：、（）「」])/.source, // 9: bare URL
].join("|"), "gu");

function isBlockStart(line) {
  return FENCE_RE.test(line) || LIST_RE.test(line) || /^\s*(#{1,6}\s|>)/.test(line);
}

function renderMarkdown(src) {
  const frag = document.createDocumentFragment();
  const lines = src.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE_RE);
    if (fence) { // an unclosed fence (reply still streaming) runs to the end of the text
      const code = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) code.push(lines[i]);
      i++;
      frag.append(codeBlock(code.join("\n"), fence[2]));
    } else if (!line.trim()) {
      i++;
    } else if (/^\s*#{1,6}\s/.test(line)) {
      const [, hashes, text] = line.match(/^\s*(#{1,6})\s+(.*)$/);
      frag.append(el(`h${Math.min(hashes.length + 2, 6)}`, inline(text)));
      i++;
    } else if (/^\s*>/.test(line)) {
      const quoted = [];
      for (; i < lines.length && /^\s*>/.test(lines[i]); i++) quoted.push(lines[i].replace(/^\s*>\s?/, ""));
      frag.append(el("blockquote", [renderMarkdown(quoted.join("\n"))]));
    } else if (LIST_RE.test(line)) {
      const ordered = /\d/.test(line.match(LIST_RE)[1]);
      const list = el(ordered ? "ol" : "ul");
      if (ordered) list.start = parseInt(line.match(LIST_RE)[1], 10);
      while (i < lines.length) {
        const m = lines[i].match(LIST_RE);
        if (m && /\d/.test(m[1]) === ordered) list.append(el("li", inline(m[2])));
        else if (lines[i].trim() && /^\s{2,}/.test(lines[i]) && !FENCE_RE.test(lines[i])) {
          list.lastChild.append(el("br"), ...inline(lines[i].trim())); // indented continuation or nested item
        } else break;
        i++;
      }
      frag.append(list);
    } else {
      const p = el("p");
      for (let first = true; i < lines.length && lines[i].trim() && (first || !isBlockStart(lines[i])); i++) {
        if (!first) p.append(el("br"));
        p.append(...inline(lines[i]));
        first = false;
      }
      frag.append(p);
    }
  }
  return frag;
}

function inline(text) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(INLINE_RE)) {
    if (m.index > last) out.push(text.slice(last, m.index));
    last = m.index + m[0].length;
    if (m[1]) out.push(el("code", [m[2]]));
    else if (m[3] !== undefined) out.push(safeLink(m[4], inline(m[3]), m[0]));
    else if (m[5] !== undefined || m[6] !== undefined) out.push(el("strong", inline(m[5] ?? m[6])));
    else if (m[7] !== undefined || m[8] !== undefined) out.push(el("em", inline(m[7] ?? m[8])));
    else out.push(safeLink(m[9], [m[9]], m[9]));
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

function safeLink(url, children, raw) {
  let parsed;
  try { parsed = new URL(url); } catch { return raw; }
  if (parsed.protocol !== "http:" && parsed.protocol !== "https:") return raw; // javascript:, data: … stay text
  return el("a", children, { href: parsed.href, target: "_blank", rel: "noopener noreferrer" });
}

function codeBlock(code, lang) {
  const copy = button("Copy", () => copyText(code, copy), "btn small ghost");
  return el("div", [
    el("div", [el("span", [lang || "code"]), copy], { class: "code-head" }),
    el("pre", [el("code", [code])]),
  ], { class: "code" });
}
