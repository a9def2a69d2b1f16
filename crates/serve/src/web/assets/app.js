// vicugna web page: chat, arena, leaderboard. Talks only to this server.
"use strict";

const $ = (id) => document.getElementById(id);

// ---------- markdown ----------
function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
// Model output is untrusted: raw HTML in it is shown as text, not rendered,
// and images are not fetched (the page loads nothing from elsewhere).
marked.use({
  gfm: true,
  breaks: true,
  renderer: {
    html: (token) => escapeHtml(token.text !== undefined ? token.text : token.raw),
    image: (token) => escapeHtml(`[image: ${token.text || token.href}]`),
  },
});
function renderMarkdown(el, text) {
  el.innerHTML = marked.parse(text || "");
  el.querySelectorAll("a").forEach((a) => {
    const href = a.getAttribute("href") || "";
    if (/^\s*javascript:/i.test(href)) a.removeAttribute("href");
    a.target = "_blank";
    a.rel = "noopener noreferrer";
  });
}

// ---------- tool calls ----------
// A reply may call functions (`tool_calls`) instead of, or besides, writing
// text, and a `role: "tool"` message carries a function's result. Both are
// shown as blocks: the function's name, then its arguments as indented JSON.

// Arguments as indented JSON; text that is not (yet) whole JSON, as it is.
function prettyJson(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch (_) { return text || ""; }
}

// Adds one streamed `delta.tool_calls` list to `calls`: the first fragment
// of a call brings its index, id and name, later ones pieces of the arguments.
function applyToolCallDeltas(calls, deltas) {
  for (const d of deltas || []) {
    const i = Number.isInteger(d.index) ? d.index : calls.length;
    const c = calls[i] || (calls[i] = { id: "", name: "", arguments: "" });
    if (d.id) c.id = d.id;
    const f = d.function || {};
    if (f.name) c.name = f.name;
    if (typeof f.arguments === "string") c.arguments += f.arguments;
  }
  return calls;
}

function toolBlock(kind, title, body) {
  const block = document.createElement("div");
  block.className = "tool-block " + kind;
  const head = document.createElement("div");
  head.className = "tool-head";
  head.textContent = title;
  const pre = document.createElement("pre");
  pre.textContent = body;
  block.append(head, pre);
  return block;
}

// Shows `calls` ({id, name, arguments} or the API's {id, function: {name,
// arguments}}) at the end of an assistant bubble, replacing earlier ones.
function renderToolCalls(el, calls) {
  el.querySelectorAll(".tool-calls").forEach((n) => n.remove());
  if (!calls || !calls.length) return;
  const box = document.createElement("div");
  box.className = "tool-calls";
  for (const c of calls.filter(Boolean)) {
    const f = c.function || c;
    box.appendChild(toolBlock("tool-call", `Calls ${f.name || "(unnamed)"}${c.id ? "  · " + c.id : ""}`, prettyJson(f.arguments)));
  }
  el.appendChild(box);
}

// An assistant reply: markdown text, then its tool calls if any.
function renderAssistant(el, text, calls) {
  renderMarkdown(el, text);
  renderToolCalls(el, calls);
}

// ---------- API key ----------
// A server started with --api-keys wants `Authorization: Bearer <key>` on
// /api/* too. The key is asked for when the server answers 401, and kept in
// this browser (localStorage) so the next visit does not ask again.
const KEY_STORE = "vicugna-api-key";
function apiKey() {
  try { return localStorage.getItem(KEY_STORE) || ""; } catch (_) { return ""; }
}
function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
  } catch (_) { /* storage off: the key lasts until the page is left */ }
  memoryKey = key;
}
let memoryKey = apiKey();
const NEEDS_KEY = "This server needs an API key. Enter it at the top of the page (it is kept in this browser).";

function askForKey(message) {
  $("key-bar").hidden = false;
  showNotice($("key-notice"), message);
  $("api-key").focus();
}

// fetch() for /api/*: adds the key, and on 401 asks for it.
async function apiFetch(path, init = {}) {
  const headers = Object.assign({}, init.headers || {});
  if (memoryKey) headers["authorization"] = "Bearer " + memoryKey;
  const resp = await fetch(path, Object.assign({}, init, { headers }));
  if (resp.status === 401) {
    const why = await errorMessage(resp);
    askForKey(memoryKey ? `The server refused the key: ${why}` : NEEDS_KEY);
    const e = new Error(memoryKey ? `The server refused the API key (${why}). Enter the right key at the top of the page.` : NEEDS_KEY);
    e.unauthorized = true;
    throw e;
  }
  return resp;
}

// ---------- server calls ----------
async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `The server answered HTTP ${resp.status}.`;
}

async function postJson(path, body) {
  const resp = await apiFetch(path, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!resp.ok) throw new Error(await errorMessage(resp));
  return resp.json();
}

// Streams one answer from /api/chat (OpenAI SSE); calls onText with the text
// and the tool calls so far.
async function streamAnswer(body, signal, onText) {
  let resp;
  try {
    resp = await apiFetch("/api/chat", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
      signal,
    });
  } catch (e) {
    if (e.name === "AbortError") return { ok: false, error: "Stopped before the answer began.", text: "" };
    return { ok: false, error: e.unauthorized ? e.message : `The connection broke: ${e.message}`, text: "" };
  }
  if (!resp.ok) return { ok: false, error: await errorMessage(resp), text: "" };
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let pending = "", text = "", finish = null, error = null;
  const toolCalls = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      let end;
      while ((end = pending.indexOf("\n\n")) >= 0) {
        const event = pending.slice(0, end).trim();
        pending = pending.slice(end + 2);
        if (!event.startsWith("data:")) continue;
        const data = event.slice(5).trim();
        if (data === "[DONE]") continue;
        let v;
        try { v = JSON.parse(data); } catch (_) { continue; }
        if (v.error) error = v.error.message || "The model failed.";
        const choice = v.choices && v.choices[0];
        if (choice && choice.delta && choice.delta.content) {
          text += choice.delta.content;
          onText(text, toolCalls);
        }
        if (choice && choice.delta && choice.delta.tool_calls) {
          applyToolCallDeltas(toolCalls, choice.delta.tool_calls);
          onText(text, toolCalls);
        }
        if (choice && choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") return { ok: true, text, toolCalls, finish: "stopped" };
    return { ok: false, error: `The connection broke: ${e.message}`, text, toolCalls };
  }
  if (error) return { ok: false, error, text, toolCalls };
  return { ok: true, text, toolCalls, finish };
}

function showNotice(el, message, kind) {
  if (!message) { el.hidden = true; el.textContent = ""; return; }
  el.hidden = false;
  el.className = "notice" + (kind ? " " + kind : "");
  el.textContent = message;
}

function addBubble(container, role, text) {
  const empty = container.querySelector(".empty");
  if (empty) empty.remove();
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.dataset.role = role;
  if (role === "assistant") renderMarkdown(el, text);
  else if (role === "tool") el.appendChild(toolBlock("tool-result", "Tool result", prettyJson(text)));
  else el.textContent = text;
  container.appendChild(el);
  container.scrollTop = container.scrollHeight;
  return el;
}

function markStopped(bubble, r) {
  if (r.finish !== "stopped") return;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = "(stopped)";
  bubble.appendChild(meta);
}

function params() {
  return {
    temperature: parseFloat($("p-temperature").value),
    top_p: parseFloat($("p-top-p").value),
    max_tokens: parseInt($("p-max-tokens").value, 10),
  };
}

let config = { max_input_chars: 12000, max_turns: 50, rate_limit_per_minute: 0 };
let models = [];

// ---------- tabs ----------
document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === b));
  document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === "panel-" + b.dataset.tab));
  if (b.dataset.tab === "leaderboard") loadLeaderboard();
}));

for (const [input, out, digits] of [["p-temperature", "o-temperature", 2], ["p-top-p", "o-top-p", 2], ["p-max-tokens", "o-max-tokens", 0]]) {
  $(input).addEventListener("input", () => { $(out).textContent = Number($(input).value).toFixed(digits); });
}

function submitOnEnter(textarea, form) {
  textarea.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
  });
}

// Limits the page can check before asking the server (which checks again).
function checkInput(text, turns) {
  const n = [...text].length;
  if (n > config.max_input_chars) return `Your message is ${n} characters long; the limit is ${config.max_input_chars}. Please shorten it.`;
  if (turns >= config.max_turns) return `This conversation has reached the limit of ${config.max_turns} turns. Press Clear (or New round) to start a new one.`;
  return null;
}

// ---------- chat ----------
const chat = { session: null, sessionModel: null, messages: [], abort: null, busy: false };

function chatSetBusy(busy) {
  chat.busy = busy;
  $("chat-send").hidden = busy;
  $("chat-stop").hidden = !busy;
  const hasAnswer = !busy && chat.messages.length > 0 && chat.messages[chat.messages.length - 1].role === "assistant";
  for (const id of ["chat-up", "chat-down", "chat-flag", "chat-regen"]) $(id).disabled = !hasAnswer;
  $("chat-clear").disabled = busy;
}

async function chatEnsureSession() {
  const model = $("chat-model").value;
  if (!model) throw new Error("No model is being served.");
  if (chat.session && chat.sessionModel === model) return;
  const s = await postJson("/api/session", { mode: "chat", models: [model] });
  chat.session = s.session_id;
  chat.sessionModel = model;
}

async function chatAnswer() {
  chatSetBusy(true);
  const box = $("chat-messages");
  const bubble = addBubble(box, "assistant", "");
  bubble.classList.add("streaming");
  chat.abort = new AbortController();
  const r = await streamAnswer(
    { session_id: chat.session, side: 0, messages: chat.messages, ...params() },
    chat.abort.signal,
    (text, calls) => { renderAssistant(bubble, text, calls); box.scrollTop = box.scrollHeight; },
  );
  bubble.classList.remove("streaming");
  chat.abort = null;
  if (!r.ok && !r.text && !(r.toolCalls && r.toolCalls.length)) {
    bubble.remove();
    showNotice($("chat-notice"), r.error);
    chatSetBusy(false);
    return false;
  }
  renderAssistant(bubble, r.text, r.toolCalls);
  markStopped(bubble, r);
  if (!r.ok) showNotice($("chat-notice"), r.error);
  else if (r.finish === "length") showNotice($("chat-notice"), "The answer reached the max output tokens; raise it under Parameters for longer answers.", "info");
  chat.messages.push({ role: "assistant", content: r.text });
  chatSetBusy(false);
  return true;
}

$("chat-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (chat.busy) return;
  const text = $("chat-input").value.trim();
  if (!text) return;
  if (chat.sessionModel && chat.sessionModel !== $("chat-model").value) chatClear();
  const turns = chat.messages.filter((m) => m.role === "user").length;
  const problem = checkInput(text, turns);
  if (problem) { showNotice($("chat-notice"), problem); return; }
  showNotice($("chat-notice"), null);
  try { await chatEnsureSession(); } catch (err) { showNotice($("chat-notice"), err.message); return; }
  chat.messages.push({ role: "user", content: text });
  const userBubble = addBubble($("chat-messages"), "user", text);
  $("chat-input").value = "";
  const ok = await chatAnswer();
  if (!ok) {
    // Not answered (a limit, an error): take the message back so it can be edited.
    chat.messages.pop();
    userBubble.remove();
    $("chat-input").value = text;
    chatSetBusy(false);
  }
});
submitOnEnter($("chat-input"), $("chat-form"));
$("chat-stop").addEventListener("click", () => { if (chat.abort) chat.abort.abort(); });

function chatClear() {
  chat.session = null;
  chat.sessionModel = null;
  chat.messages = [];
  $("chat-messages").innerHTML = '<div class="empty" id="chat-empty">Ask anything. Answers stream in; markdown and code are rendered.</div>';
  showNotice($("chat-notice"), null);
  chatSetBusy(false);
}
$("chat-clear").addEventListener("click", chatClear);
$("chat-model").addEventListener("change", () => { if (chat.messages.length) chatClear(); });

$("chat-regen").addEventListener("click", async () => {
  if (chat.busy || !chat.messages.length || chat.messages[chat.messages.length - 1].role !== "assistant") return;
  chat.messages.pop();
  const bubbles = $("chat-messages").querySelectorAll(".msg.assistant");
  bubbles[bubbles.length - 1].remove();
  showNotice($("chat-notice"), null);
  await chatAnswer();
});

for (const [id, type, label] of [["chat-up", "upvote", "Thanks for the upvote."], ["chat-down", "downvote", "Thanks, the downvote was recorded."], ["chat-flag", "flag", "The answer was flagged."]]) {
  $(id).addEventListener("click", async () => {
    try {
      await postJson("/api/vote", { session_id: chat.session, type });
      showNotice($("chat-notice"), label, "info");
      for (const v of ["chat-up", "chat-down", "chat-flag"]) $(v).disabled = true;
    } catch (err) { showNotice($("chat-notice"), err.message); }
  });
}

// ---------- arena ----------
const arena = { mode: "arena", session: null, messages: [[], []], aborts: [], busy: false, voted: false, models: null };

function arenaMode() { return document.querySelector('input[name="arena-mode"]:checked').value; }

function arenaSetBusy(busy) {
  arena.busy = busy;
  $("arena-send").hidden = busy;
  $("arena-stop").hidden = !busy;
  const answered = !busy && arena.messages[0].length > 0 && arena.messages[0][arena.messages[0].length - 1].role === "assistant"
    && arena.messages[1][arena.messages[1].length - 1].role === "assistant";
  for (const id of ["vote-left", "vote-right", "vote-tie", "vote-bothbad"]) $(id).disabled = !answered || arena.voted;
  $("arena-input").disabled = arena.mode === "arena" && arena.voted;
  $("arena-new").disabled = busy;
}

function arenaReset() {
  arena.mode = arenaMode();
  arena.session = null;
  arena.messages = [[], []];
  arena.voted = false;
  arena.models = null;
  const named = arena.mode === "side_by_side";
  for (const side of [0, 1]) {
    $("arena-messages-" + side).innerHTML = "";
    $("name-" + side).textContent = side === 0 ? "Model A" : "Model B";
    $("name-" + side).classList.remove("revealed");
    $("arena-model-" + side).hidden = !named;
  }
  document.querySelectorAll(".vote-row .vote").forEach((b) => b.classList.remove("chosen"));
  $("arena-rules").textContent = named
    ? "Pick two models; both answer the same question side by side. Vote as often as you like, one vote per round."
    : "Two anonymous models answer the same question. Vote for the better one; their names are revealed after your vote.";
  showNotice($("arena-notice"), null);
  arenaSetBusy(false);
}
document.querySelectorAll('input[name="arena-mode"]').forEach((r) => r.addEventListener("change", arenaReset));
$("arena-new").addEventListener("click", arenaReset);
for (const side of [0, 1]) $("arena-model-" + side).addEventListener("change", () => { if (arena.messages[0].length) arenaReset(); });

async function arenaEnsureSession() {
  if (arena.session) return;
  const body = { mode: arena.mode };
  if (arena.mode === "side_by_side") body.models = [$("arena-model-0").value, $("arena-model-1").value];
  const s = await postJson("/api/session", body);
  arena.session = s.session_id;
}

async function arenaSide(side) {
  const box = $("arena-messages-" + side);
  const bubble = addBubble(box, "assistant", "");
  bubble.classList.add("streaming");
  const abort = new AbortController();
  arena.aborts[side] = abort;
  const r = await streamAnswer(
    { session_id: arena.session, side, messages: arena.messages[side], ...params() },
    abort.signal,
    (text, calls) => { renderAssistant(bubble, text, calls); box.scrollTop = box.scrollHeight; },
  );
  bubble.classList.remove("streaming");
  if (!r.ok && !r.text && !(r.toolCalls && r.toolCalls.length)) { bubble.remove(); return r; }
  renderAssistant(bubble, r.text, r.toolCalls);
  markStopped(bubble, r);
  arena.messages[side].push({ role: "assistant", content: r.text });
  return r;
}

$("arena-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (arena.busy) return;
  if (arena.mode === "arena" && arena.voted) { showNotice($("arena-notice"), "This battle is over. Press New round to start another."); return; }
  const text = $("arena-input").value.trim();
  if (!text) return;
  const problem = checkInput(text, arena.messages[0].filter((m) => m.role === "user").length);
  if (problem) { showNotice($("arena-notice"), problem); return; }
  showNotice($("arena-notice"), null);
  try { await arenaEnsureSession(); } catch (err) { showNotice($("arena-notice"), err.message); return; }
  const bubbles = [];
  for (const side of [0, 1]) {
    arena.messages[side].push({ role: "user", content: text });
    bubbles.push(addBubble($("arena-messages-" + side), "user", text));
  }
  $("arena-input").value = "";
  arenaSetBusy(true);
  const results = await Promise.all([arenaSide(0), arenaSide(1)]);
  const failed = results.find((r) => !r.ok);
  if (failed) showNotice($("arena-notice"), failed.error);
  // A side with no answer: take the question back on both sides.
  if (results.some((r) => !r.ok && !r.text)) {
    for (const side of [0, 1]) {
      const m = arena.messages[side];
      if (m.length && m[m.length - 1].role === "assistant") {
        m.pop();
        const a = $("arena-messages-" + side).querySelectorAll(".msg.assistant");
        a[a.length - 1].remove();
      }
      m.pop();
      bubbles[side].remove();
    }
    $("arena-input").value = text;
  }
  arena.aborts = [];
  arenaSetBusy(false);
});
submitOnEnter($("arena-input"), $("arena-form"));
$("arena-stop").addEventListener("click", () => arena.aborts.forEach((a) => a && a.abort()));

for (const [id, type] of [["vote-left", "leftvote"], ["vote-right", "rightvote"], ["vote-tie", "tievote"], ["vote-bothbad", "bothbad_vote"]]) {
  $(id).addEventListener("click", async () => {
    try {
      const r = await postJson("/api/vote", { session_id: arena.session, type });
      arena.voted = arena.mode === "arena";
      $(id).classList.add("chosen");
      if (arena.mode === "arena") {
        for (const side of [0, 1]) {
          $("name-" + side).textContent = (side === 0 ? "Model A: " : "Model B: ") + r.models[side];
          $("name-" + side).classList.add("revealed");
        }
      }
      showNotice($("arena-notice"), arena.mode === "arena"
        ? `Thanks for voting! Model A was ${r.models[0]}, Model B was ${r.models[1]}. Press New round for another battle.`
        : "Thanks, your vote was recorded.", "info");
      for (const v of ["vote-left", "vote-right", "vote-tie", "vote-bothbad"]) $(v).disabled = true;
      $("arena-input").disabled = arena.mode === "arena";
    } catch (err) { showNotice($("arena-notice"), err.message); }
  });
}

// ---------- leaderboard ----------
function heat(f) {
  // Red (0) through white (0.5) to blue (1).
  const t = Math.max(0, Math.min(1, f));
  const [r, g, b] = t < 0.5
    ? [255, Math.round(200 + 110 * t), Math.round(200 + 110 * t)]
    : [Math.round(255 - 150 * (t - 0.5)), Math.round(255 - 90 * (t - 0.5)), 255];
  return `rgb(${r},${g},${b})`;
}

async function loadLeaderboard() {
  $("lb-summary").textContent = "Loading…";
  let board;
  try {
    const resp = await apiFetch("/api/leaderboard");
    if (!resp.ok) throw new Error(await errorMessage(resp));
    board = await resp.json();
  } catch (err) { $("lb-summary").textContent = err.message; return; }
  $("lb-summary").textContent = board.battles === 0
    ? "No votes yet. Vote in an anonymous battle in the Arena tab and come back."
    : `${board.battles} vote${board.battles === 1 ? "" : "s"} · ${board.models.length} models · ${board.bootstrap_rounds} bootstrap rounds`;
  const tbody = $("lb-table").querySelector("tbody");
  tbody.innerHTML = "";
  for (const r of board.rows) {
    const tr = document.createElement("tr");
    tr.dataset.model = r.model;
    const cells = [r.rank, r.model, r.rating.toFixed(1), `${r.ci_low.toFixed(1)} – ${r.ci_high.toFixed(1)}`, r.votes, r.wins, r.losses, r.ties];
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
    tbody.appendChild(tr);
  }
  const m = $("lb-matrix");
  m.innerHTML = "";
  if (board.models.length < 2) return;
  const head = document.createElement("tr");
  head.appendChild(document.createElement("th"));
  for (const name of board.models) { const th = document.createElement("th"); th.textContent = name; head.appendChild(th); }
  m.appendChild(head);
  board.models.forEach((name, i) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th"); th.textContent = name; tr.appendChild(th);
    board.win_fraction[i].forEach((f) => {
      const td = document.createElement("td");
      if (f === null) td.textContent = "–"; else { td.textContent = f.toFixed(2); td.style.background = heat(f); }
      tr.appendChild(td);
    });
    m.appendChild(tr);
  });
}
$("lb-refresh").addEventListener("click", loadLeaderboard);

// ---------- start ----------
async function start() {
  try {
    const resp = await apiFetch("/api/config");
    if (resp.ok) config = await resp.json();
  } catch (_) { /* keep defaults (the key bar is up on a 401) */ }
  const limits = [`messages up to ${config.max_input_chars} characters`, `${config.max_turns} turns per conversation`];
  if (config.rate_limit_per_minute > 0) limits.push(`${config.rate_limit_per_minute} messages per minute`);
  $("chat-limits").textContent = "Limits: " + limits.join(" · ") + (config.logging ? " · conversations and votes are logged" : "");
  try {
    const resp = await apiFetch("/api/models");
    if (!resp.ok) throw new Error(await errorMessage(resp));
    models = (await resp.json()).models;
  } catch (err) {
    showNotice($("chat-notice"), "Could not list the models: " + err.message);
  }
  for (const [id, pick] of [["chat-model", 0], ["arena-model-0", 0], ["arena-model-1", 1]]) {
    const sel = $(id);
    sel.innerHTML = "";
    for (const name of models) { const o = document.createElement("option"); o.value = name; o.textContent = name; sel.appendChild(o); }
    if (models.length) sel.value = models[Math.min(pick, models.length - 1)];
  }
  if (models.length < 2) $("arena-rules").textContent = "The arena needs at least two served models; this server has " + models.length + ".";
  else if (!arena.session) arenaReset();
  document.body.dataset.ready = "true";
}
$("key-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) { showNotice($("key-notice"), "Enter the key first."); return; }
  setApiKey(key);
  $("api-key").value = "";
  showNotice($("key-notice"), null);
  $("key-bar").hidden = true;
  // Try it at once: a wrong key brings the bar back with the server's reason.
  showNotice($("chat-notice"), null);
  await start();
});
$("key-forget").addEventListener("click", () => {
  setApiKey("");
  askForKey("The key was forgotten. Enter a key to use this server.");
});

arenaReset();
chatSetBusy(false);
start();
