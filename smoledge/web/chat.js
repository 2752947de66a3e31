// The chat page of `smoledge serve`: talks to this server's own /v1 API (OpenAI chat completions, streamed
// as server-sent events), keeps the conversation in the page, and shows where each answer ran (local or
// cloud, and why). No third-party code, nothing fetched from elsewhere. <body data-state> is loading,
// ready, busy, done or error (the browser test waits on it).
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // OpenAI messages of this conversation, images as data URLs
let pendingImage = null; // the data URL of the picked image, sent with the next turn
let modelId = null; // from /v1/models

function setState(state, status) {
  document.body.dataset.state = state;
  if (status !== undefined) $("status").textContent = status;
}

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

function addTurn(role, text, image) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  if (image) {
    const img = document.createElement("img");
    img.src = image;
    img.alt = "attached image";
    div.append(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.append(span);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function showRoute(turn, info) {
  if (!info || !info.route) return;
  let el = turn.querySelector(".route");
  if (!el) {
    el = document.createElement("span");
    el.className = "route";
    turn.append(el);
  }
  el.textContent = `route: ${info.route}${info.reason ? ` (${info.reason})` : ""}`;
  turn.dataset.route = info.route;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error && body.error.message ? body.error.message : `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.ok) {
      const body = await response.json();
      modelId = body.data && body.data[0] ? body.data[0].id : null;
      $("model").textContent = modelId || "";
    } else {
      $("model").textContent = response.status === 401 ? "this server needs an API key" : await errorText(response);
    }
  } catch (err) {
    $("model").textContent = `cannot reach the server: ${err.message}`;
  }
  setState("ready", "");
}

function request() {
  const body = { messages: history, stream: true, stream_options: { include_usage: true } };
  if (modelId) body.model = modelId;
  const temperature = $("temperature").value.trim();
  const maxTokens = $("max-tokens").value.trim();
  if (temperature !== "") body.temperature = Number(temperature);
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  return body;
}

// Reads the SSE stream; calls onEvent(json) per data line; resolves at [DONE] or the end of the stream.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
    if (done) return;
  }
}

async function send(text) {
  const content = [];
  if (pendingImage) content.push({ type: "image_url", image_url: { url: pendingImage } });
  content.push({ type: "text", text });
  addTurn("user", text, pendingImage);
  history.push({ role: "user", content });
  pendingImage = null;
  $("image").value = "";
  $("preview").hidden = true;
  const answer = addTurn("assistant", "");
  const out = answer.querySelector(".text");
  const started = performance.now();
  let usage = null;
  let failure = null;
  setState("busy", "thinking...");
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(request()) });
    if (!response.ok) throw new Error(await errorText(response));
    showRoute(answer, { route: response.headers.get("x-smoledge-route"), reason: response.headers.get("x-smoledge-route-reason") });
    await readEvents(response, (event) => {
      if (event.error) failure = event.error.message;
      if (event.smoledge) showRoute(answer, event.smoledge);
      if (event.usage) usage = event.usage;
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) out.textContent += delta.content;
    });
    if (failure) throw new Error(failure);
  } catch (err) {
    answer.classList.add("error");
    out.textContent += (out.textContent ? "\n" : "") + `error: ${err.message}`;
    history.pop(); // the turn did not get an answer: it leaves the conversation
    setState("error", err.message);
    return;
  }
  history.push({ role: "assistant", content: out.textContent });
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  const tokens = usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} answer tokens, ` : "";
  setState("done", `${tokens}${seconds} s, ${answer.dataset.route || "?"}`);
}

function pickImage() {
  const file = $("image").files[0];
  if (!file) {
    pendingImage = null;
    $("preview").hidden = true;
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    pendingImage = reader.result;
    $("preview").src = pendingImage;
    $("preview").hidden = false;
  };
  reader.readAsDataURL(file);
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || document.body.dataset.state === "busy") return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  $("image").addEventListener("change", pickImage);
  $("new").addEventListener("click", () => {
    history.length = 0;
    $("log").replaceChildren();
    setState("ready", "new conversation");
  });
  $("api-key").addEventListener("change", loadModel);
  loadModel();
});
