// The interactive API page at /docs: reads /openapi.json, lists each
// operation with its request fields, and sends requests from a form.
// Everything from the document is inserted as text, never as HTML.
"use strict";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

// Follows a local "#/components/schemas/X" reference.
function resolve(doc, s) {
  let seen = 0;
  while (s && s.$ref && seen++ < 16) {
    s = s.$ref.replace(/^#\//, "").split("/").reduce((o, k) => (o ? o[k] : undefined), doc);
  }
  return s || {};
}

// A short description of a schema's type.
function typeOf(doc, s) {
  s = resolve(doc, s);
  if (s.enum) return s.enum.map((v) => JSON.stringify(v)).join(" | ");
  const alts = s.anyOf || s.oneOf;
  if (alts) return alts.map((a) => typeOf(doc, a)).join(" or ");
  if (s.type === "array") return "array of " + typeOf(doc, s.items || {});
  let t = s.type || "any";
  const bounds = [];
  if (s.minimum !== undefined) bounds.push("≥ " + s.minimum);
  if (s.maximum !== undefined) bounds.push("≤ " + s.maximum);
  if (bounds.length) t += " (" + bounds.join(", ") + ")";
  return t;
}

// A request body to start from: the required fields, plus a working chat.
function example(doc, schema, model) {
  const s = resolve(doc, schema);
  const props = s.properties || {};
  const out = {};
  if ("model" in props) out.model = model;
  if ("messages" in props) out.messages = [{ role: "user", content: "Hello! Who are you?" }];
  if ("prompt" in props) out.prompt = "Once upon a time";
  if ("input" in props) out.input = "Hello";
  if ("max_tokens" in props) out.max_tokens = 64;
  for (const r of s.required || []) {
    if (r in out) continue;
    const p = resolve(doc, props[r]);
    out[r] = p.enum ? p.enum[0] : p.type === "array" ? [] : p.type === "object" ? {} :
      p.type === "integer" || p.type === "number" ? 0 : p.type === "boolean" ? false : "";
  }
  return out;
}

function fieldTable(doc, schema) {
  const s = resolve(doc, schema);
  const req = new Set(s.required || []);
  const rows = Object.entries(s.properties || {}).map(([name, p]) => {
    const r = resolve(doc, p);
    return el("tr", {}, el("td", {}, el("code", {}, name), req.has(name) ? " *" : ""),
      el("td", {}, typeOf(doc, r)), el("td", {}, r.description || ""));
  });
  return el("table", { class: "fields" },
    el("tr", {}, el("th", {}, "field (* required)"), el("th", {}, "type"), el("th", {}, "")), ...rows);
}

async function send(method, path, params, bodyText, out, status) {
  out.textContent = "";
  status.textContent = "…";
  let url = path.replace(/\{(\w+)\}/g, (_, n) => encodeURIComponent(params[n] ? params[n].value : ""));
  const headers = {};
  const key = document.getElementById("key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  const init = { method: method.toUpperCase(), headers };
  if (bodyText !== null) {
    try { JSON.parse(bodyText); } catch (e) { status.textContent = "the body is not JSON: " + e.message; return; }
    headers["Content-Type"] = "application/json";
    init.body = bodyText;
  }
  let r;
  try { r = await fetch(url, init); } catch (e) { status.textContent = "request failed: " + e.message; return; }
  status.textContent = r.status + " " + r.statusText;
  const type = r.headers.get("content-type") || "";
  if (type.includes("json")) {
    const text = await r.text();
    try { out.textContent = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { out.textContent = text; }
    return;
  }
  // Streams (text/event-stream) and text are shown as they arrive.
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    out.textContent += dec.decode(value, { stream: true });
  }
}

function operation(doc, path, method, op, model) {
  const d = el("details", { class: "op" });
  d.append(el("summary", {}, el("span", { class: "method " + method }, method),
    el("span", { class: "path" }, path), op.summary || "",
    ...(op.tags || []).map((t) => el("span", { class: "tag" }, "[" + t + "]"))));
  const body = el("div", { class: "body" });
  const params = {};
  for (const p of op.parameters || []) {
    const input = el("input", { type: "text" });
    input.value = p.name === "model" ? model : "";
    params[p.name] = input;
    body.append(el("label", {}, p.name + " (" + p.in + "): ", input), el("br"));
  }
  let area = null;
  const rb = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
  if (rb) {
    body.append(fieldTable(doc, rb.schema));
    area = el("textarea", { spellcheck: "false" });
    area.value = JSON.stringify(example(doc, rb.schema, model), null, 2);
    body.append(area);
  }
  const out = el("pre", { class: "out" });
  const status = el("span", { class: "status" });
  const button = el("button", { type: "button" }, "Send");
  button.addEventListener("click", () => send(method, path, params, area ? area.value : null, out, status));
  const codes = Object.entries(op.responses || {}).map(([c, r]) => c + ": " + (r.description || "")).join("\n");
  body.append(el("div", {}, button, status), out, el("details", {}, el("summary", {}, "responses"), el("pre", {}, codes)));
  d.append(body);
  return d;
}

async function main() {
  const ops = document.getElementById("ops");
  let doc;
  try {
    const r = await fetch("/openapi.json");
    doc = await r.json();
  } catch (e) {
    ops.textContent = "Could not load /openapi.json: " + e.message;
    return;
  }
  document.getElementById("title").textContent = (doc.info && doc.info.title || "API") + " " + (doc.info && doc.info.version || "");
  let model = "";
  try {
    const m = await (await fetch("/v1/models")).json();
    model = (m.data && m.data[0] && m.data[0].id) || "";
  } catch (_) { /* needs a key, or no worker yet: the user types the name */ }
  ops.textContent = "";
  for (const [path, item] of Object.entries(doc.paths || {})) {
    for (const [method, op] of Object.entries(item)) {
      ops.append(operation(doc, path, method, op, model));
    }
  }
}

main();
