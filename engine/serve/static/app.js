// tinyllama's chat page: conversations streamed from /v1/chat/completions, and on any reply, its tokens'
// probabilities and a look inside the model (/v1/inspect/attention, /v1/inspect/lens). Model text is only ever
// set as text (textContent), never parsed as HTML.
import { APIError, getJSON, postJSON, streamChat } from "./api.js";
import { drawAttention, drawHeads, drawLens } from "./draw.js";
import * as store from "./store.js";
import { legend, showTooltip, tokenSpans } from "./tokens.js";

const $ = (id) => document.getElementById(id);
const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
};

const state = {
  chats: store.loadChats(),
  currentId: store.loadCurrent(),
  settings: store.loadSettings(),
  apiKey: store.loadKey(),
  busy: null, // {controller} while a reply streams
  retry: null, // what to run again once an API key is given
  tokenViews: new Set(), // indices of replies shown as tokens
  inspecting: null, // {index, layer, head}
};

function current() {
  let chat = state.chats.find((c) => c.id === state.currentId);
  if (!chat) {
    chat = store.newChat();
    state.chats.unshift(chat);
    state.currentId = chat.id;
  }
  return chat;
}

function save() {
  store.saveChats(state.chats, state.currentId);
}

// ---- the conversation ------------------------------------------------------------------------------------------
function renderChats() {
  const list = $("chat-list");
  list.replaceChildren();
  for (const chat of state.chats) {
    const item = el("li", chat.id === state.currentId ? "current" : "");
    const open = el("button", "open", chat.title || "New chat");
    open.type = "button";
    open.addEventListener("click", () => { if (!state.busy) selectChat(chat.id); });
    const remove = el("button", "delete", "✕");
    remove.type = "button";
    remove.setAttribute("aria-label", "Delete this chat");
    remove.addEventListener("click", () => deleteChat(chat.id));
    item.append(open, remove);
    list.append(item);
  }
}

function selectChat(id) {
  state.currentId = id;
  state.tokenViews.clear();
  closeInspector();
  save();
  renderChats();
  renderMessages();
  $("chats").classList.remove("open");
}

function deleteChat(id) {
  if (state.busy) return;
  state.chats = state.chats.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = state.chats[0] ? state.chats[0].id : null;
  current();
  selectChat(state.currentId);
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const chat = current();
  if (!chat.messages.length) box.append(el("p", "empty-chat", "Ask something. Enter sends, Shift+Enter is a new line."));
  chat.messages.forEach((message, i) => box.append(messageElement(chat, message, i)));
}

function messageElement(chat, message, i) {
  const article = el("article", `msg ${message.role}`);
  article.dataset.index = String(i);
  article.dataset.state = message.meta?.state || "done";
  article.append(el("div", "role", message.role === "user" ? "You" : "Model"));
  const body = el("div", "body");
  const last = i === chat.messages.length - 1;
  const lastUser = chat.messages.map((m) => m.role).lastIndexOf("user") === i;
  const logprobs = message.meta?.logprobs;
  if (message.role === "assistant" && state.tokenViews.has(i) && logprobs) {
    body.classList.add("tokens");
    body.append(tokenSpans(logprobs));
    body.addEventListener("mouseover", (e) => tokenTip(e, logprobs));
    body.addEventListener("focusin", (e) => tokenTip(e, logprobs));
    body.addEventListener("click", (e) => tokenTip(e, logprobs));
    body.addEventListener("mouseleave", hideTooltip);
  } else {
    body.textContent = message.content;
  }
  article.append(body);
  if (message.role === "assistant" && message.meta) article.append(metaLine(message.meta));
  const actions = el("div", "actions");
  const busy = Boolean(state.busy);
  if (message.role === "assistant" && article.dataset.state !== "streaming") {
    if (logprobs && logprobs.length) {
      actions.append(button(state.tokenViews.has(i) ? "Text" : "Probabilities", "show-tokens", () => {
        if (state.tokenViews.has(i)) state.tokenViews.delete(i); else state.tokenViews.add(i);
        hideTooltip();
        renderMessages();
      }));
    }
    actions.append(button("Inside", "inspect", () => openInspector(i), busy));
    if (last) actions.append(button("Regenerate", "regenerate", regenerate, busy));
  }
  if (message.role === "user" && lastUser) actions.append(button("Edit", "edit", () => editMessage(article, i), busy));
  if (actions.childElementCount) article.append(actions);
  if (message.role === "assistant" && state.tokenViews.has(i) && logprobs) article.append(legend());
  return article;
}

function button(text, className, action, disabled = false) {
  const b = el("button", className, text);
  b.type = "button";
  b.disabled = disabled;
  b.addEventListener("click", action);
  return b;
}

function metaLine(meta) {
  const line = el("div", "meta");
  if (meta.ttft !== undefined) line.append(el("span", "ttft", `first token ${(meta.ttft / 1000).toFixed(2)} s`));
  if (meta.tps !== undefined) line.append(el("span", "tps", `${meta.tps.toFixed(1)} tokens/s`));
  if (meta.tokens !== undefined) line.append(el("span", "count", `${meta.tokens} tokens`));
  if (meta.state === "stopped") line.append(el("span", "stopped", "stopped"));
  else if (meta.finish) line.append(el("span", "finish", meta.finish === "length" ? "max tokens reached" : "end"));
  if (meta.error) line.append(el("span", "stopped", meta.error));
  return line;
}

function tokenTip(event, logprobs) {
  const span = event.target.closest(".tok");
  if (!span) return;
  showTooltip($("tooltip"), span, logprobs[Number(span.dataset.index)]);
}

function hideTooltip() {
  $("tooltip").hidden = true;
}

function editMessage(article, i) {
  const chat = current();
  const body = article.querySelector(".body");
  const box = el("div", "edit-box");
  const area = el("textarea");
  area.value = chat.messages[i].content;
  const save = button("Send", "edit-send", () => {
    if (!area.value.trim() || state.busy) return;
    chat.messages[i].content = area.value;
    chat.messages.length = i + 1; // the old reply goes
    if (i === 0) chat.title = titleOf(area.value);
    state.tokenViews.clear();
    generate();
  });
  const cancel = button("Cancel", "edit-cancel", renderMessages);
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); save.click(); }
  });
  const row = el("div", "actions");
  row.append(save, cancel);
  box.append(area, row);
  body.replaceWith(box);
  article.querySelector(".actions:not(.edit-box .actions)")?.remove();
  area.focus();
}

function titleOf(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 40 ? `${line.slice(0, 39)}…` : line;
}

// ---- sending and streaming -------------------------------------------------------------------------------------
function requestBody(messages) {
  const s = state.settings;
  const body = { messages, logprobs: true, top_logprobs: 5, stream_options: { include_usage: true } };
  const number = (v) => (v === "" || v === null || v === undefined || Number.isNaN(Number(v)) ? null : Number(v));
  if (number(s.temperature) !== null) body.temperature = number(s.temperature);
  if (number(s.top_p) !== null) body.top_p = number(s.top_p);
  if (number(s.top_k)) body.top_k = number(s.top_k);
  if (number(s.max_tokens)) body.max_tokens = number(s.max_tokens);
  if (number(s.seed) !== null) body.seed = Math.trunc(number(s.seed));
  return body;
}

// The conversation as the API takes it: the system prompt, then every message (up to `end`, exclusive).
function apiMessages(chat, end = chat.messages.length, system = state.settings.system) {
  const messages = [];
  if (system.trim()) messages.push({ role: "system", content: system });
  for (const m of chat.messages.slice(0, end)) messages.push({ role: m.role, content: m.content });
  return messages;
}

function send() {
  const input = $("input");
  const text = input.value;
  if (!text.trim() || state.busy) return;
  const chat = current();
  if (!chat.messages.length) chat.title = titleOf(text);
  chat.messages.push({ role: "user", content: text });
  input.value = "";
  generate();
}

function regenerate() {
  const chat = current();
  if (state.busy || chat.messages.at(-1)?.role !== "assistant") return;
  chat.messages.pop();
  state.tokenViews.delete(chat.messages.length);
  generate();
}

async function generate() {
  const chat = current();
  const messages = apiMessages(chat);
  const reply = { role: "assistant", content: "", meta: { state: "streaming", logprobs: [], system: state.settings.system } };
  chat.messages.push(reply);
  const index = chat.messages.length - 1;
  const controller = new AbortController();
  state.busy = { controller };
  showError(null);
  setBusy(true);
  save();
  renderChats();
  renderMessages();
  const article = $("messages").lastElementChild;
  const body = article.querySelector(".body");
  const started = performance.now();
  let first = null, last = null, tokens = 0;
  try {
    for await (const chunk of streamChat(requestBody(messages), state.apiKey, controller.signal)) {
      const choice = chunk.choices && chunk.choices[0];
      if (chunk.usage) reply.meta.tokens = chunk.usage.completion_tokens;
      if (!choice) continue;
      const entries = choice.logprobs?.content || [];
      const text = choice.delta?.content || "";
      if (entries.length || text) {
        const now = performance.now();
        if (first === null) first = now;
        last = now;
        tokens += entries.length;
      }
      reply.meta.logprobs.push(...entries);
      if (text) {
        reply.content += text;
        body.textContent = reply.content;
      }
      if (choice.finish_reason) reply.meta.finish = choice.finish_reason;
    }
    reply.meta.state = "done";
  } catch (error) {
    if (error.name === "AbortError") {
      reply.meta.state = "stopped";
    } else if (error instanceof APIError && error.status === 401 && !reply.content) {
      chat.messages.splice(index, 1); // nothing was generated: ask for the key, then try again
      state.retry = generate;
      askForKey(error.message);
      finish();
      return;
    } else {
      reply.meta.state = "error";
      reply.meta.error = error.message;
      if (!reply.content) showError(error.message);
    }
  }
  if (first !== null) {
    reply.meta.ttft = first - started;
    if (tokens > 1 && last > first) reply.meta.tps = (tokens - 1) / ((last - first) / 1000);
  }
  if (reply.meta.tokens === undefined) reply.meta.tokens = tokens;
  finish();
}

function finish() {
  state.busy = null;
  setBusy(false);
  save();
  renderChats();
  renderMessages();
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.dataset.busy = busy ? "1" : "";
}

function stop() {
  if (state.busy) state.busy.controller.abort();
}

function showError(message) {
  const box = $("error");
  box.hidden = !message;
  box.textContent = message || "";
}

function askForKey(message) {
  $("key-panel").hidden = false;
  $("key-panel").dataset.reason = message;
  $("key-input").value = "";
  $("key-input").focus();
}

function useKey(key) {
  state.apiKey = key.trim();
  store.saveKey(state.apiKey);
  $("set-key").value = state.apiKey;
  $("key-panel").hidden = true;
  const retry = state.retry;
  state.retry = null;
  if (retry) retry();
}

// ---- looking inside a reply ------------------------------------------------------------------------------------
function fillSelect(select, n, value) {
  if (select.options.length !== n) {
    select.replaceChildren(...Array.from({ length: n }, (_, i) => new Option(String(i), String(i))));
  }
  select.value = String(value);
}

function openInspector(index) {
  const chat = current();
  state.inspecting = { index, layer: state.inspecting?.layer ?? 0, head: state.inspecting?.head ?? 0, lens: null,
    messages: apiMessages(chat, index + 1, chat.messages[index].meta?.system ?? state.settings.system), heads: null };
  $("inspector").hidden = false;
  $("inspect-what").textContent = `(reply ${chat.messages.slice(0, index + 1).filter((m) => m.role === "assistant").length})`;
  selectTab("attention");
  loadAttention(true);
  $("inspector").scrollIntoView({ block: "start" });
}

function closeInspector() {
  state.inspecting = null;
  $("inspector").hidden = true;
}

function status(text) {
  $("inspect-status").textContent = text;
}

async function loadAttention(withSummary) {
  const view = state.inspecting;
  if (!view) return;
  const canvas = $("attention-canvas");
  canvas.dataset.ready = "";
  status("tracing…");
  try {
    const body = { messages: view.messages, layer: view.layer, head: view.head, summary: withSummary || !view.heads };
    const result = await postJSON("/v1/inspect/attention", body, state.apiKey);
    if (state.inspecting !== view) return;
    fillSelect($("pick-layer"), result.num_layers, result.layer);
    fillSelect($("pick-head"), result.num_heads, result.head);
    if (result.heads) view.heads = result.heads;
    drawAttention(canvas, $("attention-info"), result.tokens, result.attention, `layer ${result.layer}, head ${result.head}`);
    canvas.dataset.layer = String(result.layer);
    canvas.dataset.head = String(result.head);
    canvas.tokenIds = result.tokens.map((t) => t.id);
    drawHeads($("heads-canvas"), $("heads-info"), view.heads, (layer, head) => {
      view.layer = layer;
      view.head = head;
      loadAttention(false);
    });
    status(`${result.tokens.length} tokens · layer ${result.layer}, head ${result.head}`);
    canvas.dataset.ready = "1";
  } catch (error) {
    if (error instanceof APIError && error.status === 401) {
      state.retry = () => loadAttention(withSummary);
      askForKey(error.message);
    }
    status(`cannot inspect: ${error.message}`);
  }
}

async function loadLens() {
  const view = state.inspecting;
  if (!view) return;
  const canvas = $("lens-canvas");
  if (view.lens) return;
  canvas.dataset.ready = "";
  status("tracing…");
  try {
    view.lens = await postJSON("/v1/inspect/lens", { messages: view.messages }, state.apiKey);
    if (state.inspecting !== view) return;
    drawLens(canvas, $("lens-info"), view.lens);
    canvas.tokenIds = view.lens.tokens.map((t) => t.id);
    status(`${view.lens.tokens.length} tokens · ${view.lens.rows.length} rows`);
    canvas.dataset.ready = "1";
  } catch (error) {
    status(`cannot inspect: ${error.message}`);
  }
}

function selectTab(name) {
  const attention = name === "attention";
  $("tab-attention").setAttribute("aria-selected", String(attention));
  $("tab-lens").setAttribute("aria-selected", String(!attention));
  $("attention-view").hidden = !attention;
  $("lens-view").hidden = attention;
  if (!attention) loadLens();
}

// ---- settings --------------------------------------------------------------------------------------------------
function bindSettings() {
  for (const input of document.querySelectorAll("[data-setting]")) {
    const name = input.dataset.setting;
    input.value = state.settings[name] ?? "";
    input.addEventListener("input", () => {
      state.settings[name] = input.value;
      store.saveSettings(state.settings);
    });
  }
  $("set-key").value = state.apiKey;
  $("set-key").addEventListener("change", () => useKey($("set-key").value));
}

function toggle(panelId, buttonId, className) {
  const panel = $(panelId);
  let open;
  if (className) {
    open = panel.classList.toggle(className);
  } else {
    panel.hidden = !panel.hidden;
    open = !panel.hidden;
  }
  $(buttonId).setAttribute("aria-expanded", String(open));
}

async function showModel() {
  try {
    const models = await getJSON("/v1/models", state.apiKey);
    const card = models.data[0];
    $("model-name").textContent = `· ${card.id}${card.max_model_len ? ` · ${card.max_model_len}-token window` : ""}`;
  } catch (_) { /* the name is decoration */ }
}

function main() {
  bindSettings();
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    if (state.busy) return;
    const chat = current();
    if (chat.messages.length) {
      const fresh = store.newChat();
      state.chats.unshift(fresh);
      selectChat(fresh.id);
    }
    $("input").focus();
  });
  $("key-panel").addEventListener("submit", (e) => {
    e.preventDefault();
    if ($("key-input").value.trim()) useKey($("key-input").value);
  });
  $("key-form").addEventListener("submit", (e) => { e.preventDefault(); useKey($("set-key").value); });
  $("toggle-chats").addEventListener("click", () => toggle("chats", "toggle-chats", "open"));
  $("toggle-settings").addEventListener("click", () => toggle("settings", "toggle-settings"));
  $("inspect-close").addEventListener("click", closeInspector);
  $("tab-attention").addEventListener("click", () => selectTab("attention"));
  $("tab-lens").addEventListener("click", () => selectTab("lens"));
  $("pick-layer").addEventListener("change", () => { state.inspecting.layer = Number($("pick-layer").value); loadAttention(false); });
  $("pick-head").addEventListener("change", () => { state.inspecting.head = Number($("pick-head").value); loadAttention(false); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") hideTooltip(); });
  document.addEventListener("click", (e) => { if (!e.target.closest(".tok")) hideTooltip(); });
  for (const chat of state.chats) {
    for (const message of chat.messages) if (message.meta?.state === "streaming") message.meta.state = "stopped";
  }
  current();
  save();
  renderChats();
  renderMessages();
  showModel();
  document.body.dataset.ready = "1";
}

main();
