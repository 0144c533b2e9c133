// plainlm chat page: plain JavaScript, no build step, no CDN.
// Sends the conversation to /v1/chat/completions with stream: true and renders the server-sent
// events as they arrive; the Stop button aborts the fetch, which closes the connection, and the
// server frees the request's slot at once.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop"), statusEl = $("status");
const STORE = "plainlm-chat-v1";
const SETTINGS = ["temperature", "top_p", "max_tokens", "seed", "system", "api_key"];

let messages = [];          // the conversation: [{role, content}]
let controller = null;      // AbortController of the generation in flight

// ---------------------------------------------------------------------------- persistence
function save() {
  const settings = Object.fromEntries(SETTINGS.map((k) => [k, $(k).value]));
  try { localStorage.setItem(STORE, JSON.stringify({ messages, settings })); } catch (e) { /* private mode */ }
}
function load() {
  let saved = null;
  try { saved = JSON.parse(localStorage.getItem(STORE) || "null"); } catch (e) { saved = null; }
  if (!saved) return;
  for (const [k, v] of Object.entries(saved.settings || {})) if ($(k) && v != null) $(k).value = v;
  messages = Array.isArray(saved.messages) ? saved.messages : [];
  for (const m of messages) addMessage(m.role, m.content);
}

// ---------------------------------------------------------------------------- rendering
function addMessage(role, text) {
  $("empty").hidden = true;
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text;            // textContent: model output is never parsed as HTML
  div.appendChild(bubble);
  log.appendChild(div);
  scroll();
  return div;
}
function scroll() { log.scrollTop = log.scrollHeight; }
function setBusy(busy) {
  sendBtn.hidden = busy; stopBtn.hidden = !busy; input.disabled = false;
  statusEl.textContent = busy ? "generating…" : "";
}
function addMeta(div, text) {
  const meta = document.createElement("span");
  meta.className = "meta"; meta.textContent = text;
  div.querySelector(".bubble").appendChild(meta);
}

// ---------------------------------------------------------------------------- talking to the server
function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api_key").value) h["Authorization"] = `Bearer ${$("api_key").value}`;
  return h;
}
function body() {
  const sys = $("system").value.trim();
  const b = {
    messages: sys ? [{ role: "system", content: sys }, ...messages] : messages,
    stream: true, stream_options: { include_usage: true },
    temperature: parseFloat($("temperature").value), top_p: parseFloat($("top_p").value),
  };
  const mt = parseInt($("max_tokens").value, 10);
  if (mt > 0) b.max_tokens = mt;
  const seed = $("seed").value.trim();
  if (seed !== "") b.seed = parseInt(seed, 10);
  return b;
}

async function send(text) {
  messages.push({ role: "user", content: text });
  addMessage("user", text);
  save();
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  const bubble = div.querySelector(".bubble");
  let reply = "", usage = null, finish = null, t0 = performance.now(), tFirst = null;
  controller = new AbortController();
  setBusy(true);
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body()), signal: controller.signal });
    if (!resp.ok) {
      let msg = `HTTP ${resp.status}`;
      try { msg = (await resp.json()).error.message || msg; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {          // one server-sent event per blank line
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;        // ": keep-alive" comments and the like
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          const c = chunk.choices && chunk.choices[0];
          if (!c) continue;
          if (c.delta && c.delta.content) {
            if (tFirst === null) tFirst = performance.now();
            reply += c.delta.content;
            bubble.textContent = reply;
            scroll();
          }
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
    const secs = (performance.now() - t0) / 1000;
    const n = usage ? usage.completion_tokens : null;
    addMeta(div, n !== null ? `${n} tokens · ${secs.toFixed(1)} s` +
      (tFirst !== null && n > 1 ? ` · ${((n - 1) / ((performance.now() - tFirst) / 1000)).toFixed(1)} tok/s` : "") +
      (finish === "length" ? " · max tokens reached" : "") : `${secs.toFixed(1)} s`);
  } catch (e) {
    if (e.name === "AbortError") {
      addMeta(div, "stopped");
    } else {
      div.classList.add("error");
      if (!reply) bubble.textContent = "";
      addMeta(div, `error: ${e.message}`);
    }
  } finally {
    div.classList.remove("streaming");
    controller = null;
    setBusy(false);
    if (reply) { messages.push({ role: "assistant", content: reply }); }
    else { div.dataset.empty = "1"; }
    save();
    input.focus();
  }
}

// ---------------------------------------------------------------------------- wiring
$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = ""; autosize();
  send(text);
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("composer").requestSubmit(); }
});
function autosize() { input.style.height = "auto"; input.style.height = Math.min(input.scrollHeight, 300) + "px"; }
input.addEventListener("input", autosize);
stopBtn.addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  messages = [];
  log.querySelectorAll(".msg").forEach((n) => n.remove());
  $("empty").hidden = false;
  save(); input.focus();
});
$("toggle-settings").addEventListener("click", () => {
  const s = $("settings"); s.hidden = !s.hidden;
  $("toggle-settings").setAttribute("aria-expanded", String(!s.hidden));
});
for (const k of SETTINGS) $(k).addEventListener("change", save);
for (const k of ["temperature", "top_p"]) {
  const show = () => { $(`${k}-out`).textContent = $(k).value; };
  $(k).addEventListener("input", show);
  $(k).addEventListener("change", show);
}

load();
for (const k of ["temperature", "top_p"]) $(`${k}-out`).textContent = $(k).value;
fetch("/v1/models", { headers: headers() }).then((r) => r.json()).then((j) => {
  $("model").textContent = j.data && j.data[0] ? j.data[0].id : "";
}).catch(() => { $("model").textContent = ""; });
input.focus();
