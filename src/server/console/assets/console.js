// Hearth's console: the playground streams a chat completion with the key typed in (kept for this
// tab only, in sessionStorage); the live view reads /console/live, a server-sent event feed, with
// the same key. fetch() is used for both (EventSource cannot send an Authorization header).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("hearth-key") || "", live: null, ask: null };

function headers(json) {
  const h = {};
  if (state.key) h["authorization"] = "Bearer " + state.key;
  if (json) h["content-type"] = "application/json";
  return h;
}

function text(el, value) {
  el.textContent = value == null ? "" : String(value);
}

function cell(row, value) {
  const td = document.createElement("td");
  text(td, value);
  row.appendChild(td);
}

function fill(table, rows, columns) {
  const body = $(table).tBodies[0];
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const c of columns) cell(tr, c(r));
    body.appendChild(tr);
  }
}

const pct = (x) => (x == null ? "-" : (100 * x).toFixed(1) + "%");
const num = (x, d = 1) => (x == null ? "-" : Number(x).toFixed(d));

// Reads a server-sent event body: calls onData with each event's data.
async function readEvents(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let at;
    while ((at = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, at);
      buf = buf.slice(at + 2);
      const data = event
        .split("\n")
        .filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) onData(data);
    }
  }
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || resp.statusText;
  } catch (_) {
    return resp.status + " " + resp.statusText;
  }
}

async function connect() {
  state.key = $("api-key").value.trim();
  sessionStorage.setItem("hearth-key", state.key);
  text($("conn"), "connecting...");
  let resp;
  try {
    resp = await fetch("/v1/models", { headers: headers(false) });
  } catch (e) {
    text($("conn"), "cannot reach the server: " + e);
    return;
  }
  if (!resp.ok) {
    text($("conn"), "refused: " + (await errorMessage(resp)));
    return;
  }
  const list = await resp.json();
  const select = $("model");
  const before = select.value;
  select.replaceChildren();
  for (const m of list.data) {
    if (!(m.capabilities || []).includes("chat.completions")) continue;
    const o = document.createElement("option");
    o.value = o.textContent = m.id;
    select.appendChild(o);
  }
  if (before) select.value = before;
  text($("conn"), "connected");
  startLive();
  updateSnippets();
}

function body(stream) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: $("prompt").value });
  const b = { model: $("model").value, messages };
  for (const f of ["temperature", "top_p", "max_tokens", "seed"]) {
    const v = $(f).value;
    if (v !== "") b[f] = Number(v);
  }
  if (stream) {
    b.stream = true;
    b.stream_options = { include_usage: true };
  }
  return b;
}

function updateSnippets() {
  const b = body(false);
  const origin = location.origin;
  text(
    $("curl"),
    `curl ${origin}/v1/chat/completions \\\n  -H "Authorization: Bearer $HEARTH_API_KEY" \\\n` +
      `  -H "Content-Type: application/json" \\\n  -d '${JSON.stringify(b).replace(/'/g, "'\\''")}'`
  );
  const args = Object.entries(b)
    .map(([k, v]) => `    ${k}=${JSON.stringify(v, null, 0)},`)
    .join("\n");
  text(
    $("python"),
    `import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url="${origin}/v1", api_key=os.environ["HEARTH_API_KEY"])\n` +
      `reply = client.chat.completions.create(\n${args}\n)\nprint(reply.choices[0].message.content)`
  );
}

function showFacts(chunk, answered) {
  const m = chunk.metrics || {};
  const u = chunk.usage || {};
  const facts = [["model", answered]];
  if (m.route) {
    facts.push(["route", `${m.route.group}: ${m.route.model} (${m.route.reason}${m.route.escalated ? ", escalated" : ""})`]);
  }
  facts.push(["tokens", `${u.prompt_tokens} in (${(u.prompt_tokens_details || {}).cached_tokens || 0} cached), ${u.completion_tokens} out`]);
  if (m.cache) facts.push(["response cache", m.cache.hit ? `hit (${m.cache.kind})` : "miss"]);
  facts.push(["device time", num(m.device_time_ms) + " ms"]);
  if (m.time_to_first_token_ms != null) facts.push(["first token", num(m.time_to_first_token_ms) + " ms"]);
  facts.push(["speed", num(m.tokens_per_second) + " tok/s"]);
  const q = m.quality;
  if (q) {
    facts.push(["mean logprob", num(q.mean_logprob, 3)]);
    facts.push(["p10 logprob", num(q.p10_logprob, 3)]);
    facts.push(["mean entropy", num(q.mean_entropy, 3)]);
    if (q.mean_margin != null) facts.push(["mean margin", num(q.mean_margin, 3)]);
    facts.push(["repetition", pct(q.repetition)]);
    facts.push(["stopped on length", q.stopped_on_length ? "yes" : "no"]);
  }
  const dl = $("facts");
  dl.replaceChildren();
  for (const [k, v] of facts) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    text(dt, k);
    text(dd, v);
    dl.append(dt, dd);
  }
}

async function send() {
  if (state.ask) return;
  const out = $("output");
  text(out, "");
  text($("ask-error"), "");
  $("facts").replaceChildren();
  updateSnippets();
  const controller = new AbortController();
  state.ask = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  out.setAttribute("aria-busy", "true");
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify(body(true)),
      signal: controller.signal,
    });
    if (!resp.ok) {
      text($("ask-error"), await errorMessage(resp));
      return;
    }
    let answered = $("model").value;
    await readEvents(resp, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        text($("ask-error"), chunk.error.message);
        return;
      }
      if (chunk.model) answered = chunk.model;
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) out.append(c.delta.content);
        if (c.delta && c.delta.tool_calls) out.append(JSON.stringify(c.delta.tool_calls));
      }
      if (chunk.usage) showFacts(chunk, answered);
    });
  } catch (e) {
    if (e.name !== "AbortError") text($("ask-error"), String(e));
  } finally {
    out.removeAttribute("aria-busy");
    state.ask = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function stop() {
  if (state.ask) state.ask.abort();
}

function showSnapshot(s) {
  text($("live-state"), `as ${s.scope}, updated ${new Date(s.ts_ms).toLocaleTimeString()}`);
  fill("models-table", s.models || [], [
    (m) => m.name,
    (m) => m.running,
    (m) => m.waiting,
    (m) => num(m.tokens_per_second),
    (m) => pct(m.kv_usage),
    (m) => pct(m.prefix_hit_rate),
  ]);
  fill("usage-table", s.usage_today || [], [
    (u) => u.tenant,
    (u) => u.requests,
    (u) => u.prompt_tokens,
    (u) => u.completion_tokens,
    (u) => num(u.device_time_ms / 1000, 2),
    (u) => u.cache_hits,
  ]);
  fill("errors-table", s.errors, [
    (e) => new Date(e.ts_ms).toLocaleTimeString(),
    (e) => e.tenant,
    (e) => e.model || "-",
    (e) => e.status,
    (e) => e.message || e.reason,
  ]);
}

// The live feed; reconnects after a drop, stops when another key connects.
async function startLive() {
  if (state.live) state.live.abort();
  const controller = new AbortController();
  state.live = controller;
  while (!controller.signal.aborted) {
    try {
      const resp = await fetch("/console/live", { headers: headers(false), signal: controller.signal });
      if (resp.status === 401 || resp.status === 403) {
        text($("live-state"), "live view refused: " + (await errorMessage(resp)));
        return;
      }
      if (!resp.ok) throw new Error(await errorMessage(resp));
      await readEvents(resp, (data) => showSnapshot(JSON.parse(data)));
    } catch (e) {
      if (controller.signal.aborted) return;
      text($("live-state"), "reconnecting (" + e.message + ")...");
      await new Promise((r) => setTimeout(r, 2000));
      continue;
    }
    text($("live-state"), "reconnecting...");
    await new Promise((r) => setTimeout(r, 2000));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = state.key;
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    connect();
  });
  $("ask").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("stop").addEventListener("click", stop);
  $("ask").addEventListener("input", updateSnippets);
  $("ask").addEventListener("change", updateSnippets);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && e.target.closest("#ask")) {
      e.preventDefault();
      send();
    } else if (e.key === "Escape") {
      stop();
    }
  });
  // A server without keys needs none: connect at once.
  connect();
});
