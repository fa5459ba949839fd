// The page: a streaming chat with settings, and the server panel. The conversation and the API
// key live in this page's memory only: nothing is written to localStorage, sessionStorage or
// cookies, and a reload forgets both.
import { ApiError, getJson, streamChat } from "./chat.js";
import { ServerPanel } from "./panel.js";

const $ = (id) => document.getElementById(id);

const state = {
  apiKey: "",
  model: null, // the first served model name, once /v1/models answered
  history: [], // [{role, content}] of finished turns
  controller: null, // the AbortController of the reply being streamed
};

function setStatus(text) {
  $("status").textContent = text;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text; // text, never HTML: model output is untrusted
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function loadModel() {
  try {
    const models = await getJson("/v1/models", state.apiKey);
    const card = models.data[0];
    state.model = card.id;
    $("model-name").textContent = `model: ${card.id} (context ${card.max_model_len} tokens)`;
    setStatus("");
  } catch (e) {
    state.model = null;
    $("model-name").textContent = "model: ?";
    if (e instanceof ApiError && e.status === 401) setStatus("This server needs an API key: enter it above.");
    else setStatus(`Cannot reach the server: ${e.message}`);
  }
}

function requestBody() {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = { messages };
  if (state.model) body.model = state.model;
  const temperature = parseFloat($("temperature").value);
  if (Number.isFinite(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
  if ($("json-mode").checked) body.response_format = { type: "json_object" };
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send() {
  const text = $("prompt").value;
  if (!text.trim() || state.controller) return;
  $("prompt").value = "";
  addMessage("user", text);
  state.history.push({ role: "user", content: text });
  const bubble = addMessage("assistant streaming", "");
  let reply = "";
  state.controller = new AbortController();
  setBusy(true);
  setStatus("Generating…");
  const started = performance.now();
  try {
    const { finishReason, usage } = await streamChat({
      body: requestBody(),
      apiKey: state.apiKey,
      signal: state.controller.signal,
      onDelta: (delta) => {
        reply += delta;
        bubble.textContent = reply;
        bubble.scrollIntoView({ block: "end" });
      },
    });
    state.history.push({ role: "assistant", content: reply });
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const tokens = usage ? `${usage.completion_tokens} tokens, ` : "";
    setStatus(`Done (${tokens}${seconds}s${finishReason ? `, ${finishReason}` : ""}).`);
  } catch (e) {
    if (e.name === "AbortError") {
      state.history.push({ role: "assistant", content: reply });
      setStatus("Stopped.");
    } else {
      state.history.pop(); // the turn failed: the user message is not part of the conversation
      bubble.classList.add("error");
      bubble.textContent = e.message;
      setStatus(e instanceof ApiError && e.status === 401 ? "Wrong or missing API key." : "The request failed.");
    }
  } finally {
    bubble.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
  }
}

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("clear").addEventListener("click", () => {
    state.controller?.abort();
    state.history = [];
    $("messages").replaceChildren();
    setStatus("");
  });
  $("api-key").addEventListener("input", () => {
    state.apiKey = $("api-key").value.trim();
  });
  $("api-key").addEventListener("change", loadModel);
  $("key-form").addEventListener("submit", (e) => e.preventDefault()); // Enter commits (change), no reload
}

wire();
loadModel();
new ServerPanel($("server")).start();
