// Drives vicugna's web page in a real headless Chromium, as a person would:
// the API key prompt, a streamed chat answer, regenerate, a vote, stop, the input limit, an
// anonymous arena round with a vote, the leaderboard, a named side-by-side
// round, and the rate limit.
//
//   node page.mjs URL SCREENSHOT_DIR
//
// CHROMIUM names the browser (default /usr/bin/chromium); API_KEY the key the
// server was started with (default test-key). Prints one JSON
// object with what it saw; the Rust test (web_page.rs) checks it against the
// server's logs. Exits non-zero with the reason on any failure.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const [url, shots] = process.argv.slice(2);
if (!url || !shots) {
  console.error("usage: node page.mjs URL SCREENSHOT_DIR");
  process.exit(2);
}
mkdirSync(shots, { recursive: true });
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const seen = {};
const T = 60_000;
const KEY = process.env.API_KEY || "test-key";

// The notice `action` brings up: the box may already show another one (an answer
// cut at the max output tokens says so), so wait for its text to change.
async function noticeAfter(page, selector, action) {
  const before = await page.$eval(selector, (n) => (n.hidden ? "" : n.textContent));
  await action();
  await page.waitForFunction(
    ([sel, b]) => {
      const n = document.querySelector(sel);
      return !n.hidden && n.textContent !== b;
    },
    [selector, before],
    { timeout: T },
  );
  return page.textContent(selector);
}

const browser = await chromium.launch({ executablePath, headless: true, args: ["--no-sandbox", "--disable-gpu"] });
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("pageerror", (e) => { console.error("page error:", e.message); process.exitCode = 1; });

  // ---- the API key: /api/* wants it (--api-keys without --public-page) ----
  // The server refuses /api/* without the key; here each call is only watched,
  // so that no call goes out without the key once it was given.
  let keyGiven = false;
  seen.api_calls_without_key_after_entry = 0;
  await page.route("**/api/**", async (route) => {
    const auth = route.request().headers()["authorization"];
    if (keyGiven && auth !== `Bearer ${KEY}`) {
      seen.api_calls_without_key_after_entry += 1;
      (seen.unkeyed_after_entry ||= []).push(`${route.request().method()} ${new URL(route.request().url()).pathname} ${auth || "no key"}`);
    }
    return route.continue();
  });
  await page.goto(url);
  await page.waitForSelector("body[data-ready=true]", { timeout: T });
  await page.waitForSelector("#key-bar:not([hidden])", { timeout: T });
  seen.key_prompt = await page.textContent("#key-notice");
  seen.models_without_key = await page.$$eval("#chat-model option", (os) => os.length);
  await page.screenshot({ path: join(shots, "0-key-prompt.png") });
  await page.fill("#api-key", "wrong-key");
  seen.wrong_key_notice = await noticeAfter(page, "#key-notice", () => page.click("#key-save"));
  // The page's start with the wrong key ends at the model list's refusal.
  await page.waitForFunction(() => {
    const n = document.getElementById("chat-notice");
    return !n.hidden && n.textContent.includes("Could not list the models");
  }, null, { timeout: T });
  await page.fill("#api-key", KEY);
  keyGiven = true;
  await page.click("#key-save");
  await page.waitForFunction(() => document.querySelectorAll("#chat-model option").length >= 2, null, { timeout: T });
  seen.key_bar_hidden = await page.$eval("#key-bar", (e) => e.hidden);
  seen.key_stored = await page.evaluate(() => localStorage.getItem("vicugna-api-key"));

  seen.models = await page.$$eval("#chat-model option", (os) => os.map((o) => o.value));
  // Model output with HTML and an image: shown as text, nothing fetched.
  seen.rendered_untrusted = await page.evaluate(() => {
    const d = document.createElement("div");
    renderMarkdown(d, "<img src=x onerror=alert(1)> **bold** ![pic](http://example.com/p.png) [a](javascript:alert(1))");
    return d.innerHTML;
  });

  // A reply's streamed tool calls and a tool result: name and indented
  // arguments in a block, shown as text.
  seen.rendered_tool_calls = await page.evaluate(() => {
    const calls = applyToolCallDeltas([], [{ index: 0, id: "call_1", type: "function", function: { name: "get_weather", arguments: "" } }]);
    applyToolCallDeltas(calls, [{ index: 0, function: { arguments: '{"city": "<b>Paris</b>",' } }]);
    applyToolCallDeltas(calls, [{ index: 0, function: { arguments: ' "days": 2}' } }]);
    const d = document.createElement("div");
    renderAssistant(d, "", calls);
    const tool = addBubble(document.createElement("div"), "tool", '{"temp_c": 21}');
    return { head: d.querySelector(".tool-head").textContent, args: d.querySelector(".tool-calls pre").textContent, html: d.innerHTML, tool: tool.textContent };
  });

  // ---- chat: a streamed answer ----
  await page.click(".params summary");
  await page.$eval("#p-max-tokens", (el) => { el.value = "48"; el.dispatchEvent(new Event("input")); });
  await page.fill("#chat-input", "Write a Python function that adds two numbers, in a code block.");
  // Record the answer's length while it streams: more than one length before
  // the end means it arrived in pieces.
  await page.evaluate(() => {
    window.__lengths = [];
    const box = document.getElementById("chat-messages");
    new MutationObserver(() => {
      const a = box.querySelector(".msg.assistant.streaming");
      if (a) window.__lengths.push(a.textContent.length);
    }).observe(box, { subtree: true, childList: true, characterData: true });
  });
  await page.click("#chat-send");
  await page.waitForSelector("#chat-stop:not([hidden])", { timeout: T });
  await page.waitForSelector("#chat-up:not([disabled])", { timeout: T });
  seen.stream_lengths = [...new Set(await page.evaluate(() => window.__lengths.filter((n) => n > 0)))];
  seen.chat_answer = await page.textContent("#chat-messages .msg.assistant");
  seen.chat_has_markdown = await page.$$eval("#chat-messages .msg.assistant", (els) => els.some((e) => e.querySelector("p, pre, code, ol, ul, strong, em")));
  await page.screenshot({ path: join(shots, "1-chat.png") });

  // Regenerate replaces the answer with a new one.
  await page.click("#chat-regen");
  await page.waitForSelector("#chat-up:not([disabled])", { timeout: T });
  seen.chat_bubbles_after_regen = await page.$$eval("#chat-messages .msg", (els) => els.map((e) => e.dataset.role));
  seen.upvote_notice = await noticeAfter(page, "#chat-notice", () => page.click("#chat-up"));

  // ---- Stop: a long answer cut short keeps what arrived ----
  await page.$eval("#p-max-tokens", (el) => { el.value = "1024"; el.dispatchEvent(new Event("input")); });
  await page.fill("#chat-input", "Tell me a long story about a llama who learns to code.");
  await page.click("#chat-send");
  await page.waitForFunction(() => {
    const a = document.querySelector("#chat-messages .msg.assistant.streaming");
    return a && a.textContent.length > 30;
  }, null, { timeout: T });
  await page.click("#chat-stop");
  await page.waitForSelector("#chat-send:not([hidden])", { timeout: T });
  seen.stopped_answer = await page.$$eval("#chat-messages .msg.assistant", (els) => els[els.length - 1].textContent);
  await page.screenshot({ path: join(shots, "2-chat-stopped.png") });
  await page.$eval("#p-max-tokens", (el) => { el.value = "48"; el.dispatchEvent(new Event("input")); });

  // ---- the input limit, shown on the page ----
  const limit = await page.evaluate(() => apiFetch("/api/config").then((r) => r.json()));
  await page.fill("#chat-input", "x".repeat(limit.max_input_chars + 1));
  await page.click("#chat-send");
  seen.input_limit_notice = await page.textContent("#chat-notice");
  await page.screenshot({ path: join(shots, "3-chat-limit.png") });
  await page.fill("#chat-input", "");

  // ---- anonymous arena: one round, a vote, names revealed ----
  await page.click("#tab-arena");
  await page.fill("#arena-input", "Name a fruit that is yellow.");
  await page.click("#arena-send");
  await page.waitForSelector("#vote-left:not([disabled])", { timeout: T });
  seen.names_before_vote = [await page.textContent("#name-0"), await page.textContent("#name-1")];
  seen.arena_answers = await page.$$eval(".side .msg.assistant", (els) => els.map((e) => e.textContent));
  await page.screenshot({ path: join(shots, "4-arena-before-vote.png") });
  await page.click("#vote-left");
  await page.waitForFunction(() => document.getElementById("name-0").textContent.startsWith("Model A: "), null, { timeout: T });
  seen.names_after_vote = [await page.textContent("#name-0"), await page.textContent("#name-1")];
  seen.arena_input_disabled_after_vote = await page.$eval("#arena-input", (e) => e.disabled);
  await page.screenshot({ path: join(shots, "5-arena-after-vote.png") });

  // ---- leaderboard ----
  await page.click("#tab-leaderboard");
  await page.waitForSelector("#lb-table tbody tr", { timeout: T });
  seen.leaderboard = await page.$$eval("#lb-table tbody tr", (rows) => rows.map((r) => [...r.children].map((c) => c.textContent)));
  seen.leaderboard_summary = await page.textContent("#lb-summary");
  seen.matrix_cells = await page.$$eval("#lb-matrix td", (tds) => tds.map((t) => t.textContent));
  await page.screenshot({ path: join(shots, "6-leaderboard.png"), fullPage: true });

  // ---- named side by side: the person picks both models ----
  await page.click("#tab-arena");
  await page.click("text=Side by side (pick models)");
  await page.selectOption("#arena-model-0", "smol-a");
  await page.selectOption("#arena-model-1", "smol-b");
  await page.fill("#arena-input", "What is 2 + 2?");
  await page.click("#arena-send");
  await page.waitForSelector("#vote-tie:not([disabled])", { timeout: T });
  seen.named_notice = await noticeAfter(page, "#arena-notice", () => page.click("#vote-tie"));
  seen.named_models = [await page.inputValue("#arena-model-0"), await page.inputValue("#arena-model-1")];
  seen.named_input_disabled_after_vote = await page.$eval("#arena-input", (e) => e.disabled);
  await page.screenshot({ path: join(shots, "7-side-by-side.png") });

  // ---- the per-address rate limit, shown on the page ----
  await page.click("#tab-chat");
  for (let i = 0; i < 20; i++) {
    const before = await page.$$eval("#chat-messages .msg.assistant", (els) => els.length);
    await page.fill("#chat-input", `Say ${i}.`);
    await page.click("#chat-send");
    // Answered (one more finished answer) or refused (a notice).
    await page.waitForFunction((n) => {
      const notice = document.getElementById("chat-notice");
      if (!notice.hidden && notice.textContent.includes("Too many")) return true;
      const done = document.querySelectorAll("#chat-messages .msg.assistant:not(.streaming)").length;
      return done > n && !document.getElementById("chat-send").hidden;
    }, before, { timeout: T });
    const notice = await page.$eval("#chat-notice", (n) => (n.hidden ? "" : n.textContent));
    if (notice.includes("Too many messages")) { seen.rate_limit_notice = notice; break; }
  }
  await page.screenshot({ path: join(shots, "8-rate-limit.png") });
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));
