// tinyllama's chat page: conversations streamed from /v1/chat/completions (or, for a model without a chat template,
// one text continued through /v1/completions), and on any reply, its tokens' probabilities and a look inside the
// model (/v1/inspect/attention, /v1/inspect/lens). Model text is only ever set as text (textContent), never parsed
// as HTML.
import { APIError, getJSON, postJSON, streamChat, streamCompletion } from "./api.js";
import { fitWindow, joinedText, learnCosts, nextTurn, sendable, turnsBetween } from "./context.js";
import { drawAttention, drawHeads, drawLens } from "./draw.js";
import { createFollower } from "./follow.js";
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
  model: { id: "", window: null, chat: true }, // from /v1/models: the context window, whether it has a chat template
  headsMeasure: "to_first",
};
let follower = null;

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
  if (!chat.messages.length) box.append(el("p", "empty-chat", emptyText()));
  const from = chat.from || 0;
  chat.messages.forEach((message, i) => {
    if (i === from && from > 0) box.append(windowDivider());
    const article = messageElement(chat, message, i);
    if (i < from) article.classList.add("outside");
    box.append(article);
  });
}

function emptyText() {
  return state.model.chat ? "Ask something. Enter sends, Shift+Enter is a new line."
    : "This model has no chat template: it continues text. Write the beginning of one (\"Once upon a time\"); "
      + "each message continues the same text. Enter sends, Shift+Enter is a new line.";
}

function windowDivider() {
  const size = state.model.window ? `${state.model.window}-token ` : "";
  const note = el("div", "window-divider",
    `↑ Earlier turns no longer fit the model's ${size}window: they are not sent any more`
    + (state.model.chat ? " (the system prompt is)." : "."));
  note.setAttribute("role", "note");
  return note;
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
  if (meta.dropped) {
    line.append(el("span", "dropped", `left out the oldest ${meta.dropped === 1 ? "turn" : `${meta.dropped} turns`} `
      + "to fit the window"));
  }
  if (meta.ttft !== undefined) line.append(el("span", "ttft", `first token ${(meta.ttft / 1000).toFixed(2)} s`));
  if (meta.tps !== undefined) line.append(el("span", "tps", `${meta.tps.toFixed(1)} tokens/s`));
  if (meta.tokens !== undefined) line.append(el("span", "count", `${meta.tokens} tokens`));
  if (meta.usage && state.model.window) {
    const used = meta.usage.prompt_tokens + meta.usage.completion_tokens;
    line.append(el("span", "window", `window ${used} of ${state.model.window}`));
  }
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
function numberSetting(v) {
  return v === "" || v === null || v === undefined || Number.isNaN(Number(v)) ? null : Number(v);
}

// The sampling settings and max_tokens as the API takes them (max_tokens: null sends none).
function samplingFields(maxTokens) {
  const s = state.settings;
  const body = { stream_options: { include_usage: true } };
  if (numberSetting(s.temperature) !== null) body.temperature = numberSetting(s.temperature);
  if (numberSetting(s.top_p) !== null) body.top_p = numberSetting(s.top_p);
  if (numberSetting(s.top_k)) body.top_k = numberSetting(s.top_k);
  if (maxTokens) body.max_tokens = maxTokens;
  if (numberSetting(s.seed) !== null) body.seed = Math.trunc(numberSetting(s.seed));
  return body;
}

// The system prompt sent: the setting, for a chat model only ("" when none).
function systemPrompt() {
  if (!state.model.chat || !state.settings.system.trim()) return "";
  return state.settings.system;
}

// The conversation as the API takes it, for a reply at `end` sent from `from`: the system prompt, then every
// message sent (no failed or empty reply); `withEnd` adds messages[end] itself (a reply being inspected).
function apiMessages(chat, from, end, system, withEnd = false) {
  const messages = [];
  if (system && system.trim()) messages.push({ role: "system", content: system });
  const indices = sendable(chat.messages, from, end);
  if (withEnd) indices.push(end);
  for (const i of indices) messages.push({ role: chat.messages[i].role, content: chat.messages[i].content });
  return messages;
}

// A completion-only model's text for the reply at `end`: the parts sent, joined (see context.js).
function apiPrompt(chat, from, end, withEnd = false) {
  const indices = sendable(chat.messages, from, end);
  if (withEnd) indices.push(end);
  return joinedText(indices.map((i) => chat.messages[i]));
}

// Completions' legacy logprobs block -> chat's entries ({token, logprob, top_logprobs: [{token, logprob}]}).
function chatLogprobs(block) {
  if (!block || !block.tokens) return [];
  return block.tokens.map((token, i) => ({
    token, logprob: block.token_logprobs[i],
    top_logprobs: Object.entries(block.top_logprobs?.[i] || {}).map(([t, logprob]) => ({ token: t, logprob })),
  }));
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

// Streams one reply into `reply` (its text, log-probabilities, usage and the server's timings), reading the page's
// clock into `clock` ({started, first, last}: the request sent, the first and the last token received) and counting
// the tokens received.
async function streamReply(chat, reply, fit, body, clock, signal) {
  const system = reply.meta.system;
  const end = chat.messages.length - 1;
  const request = state.model.chat
    ? streamChat({ messages: apiMessages(chat, fit.from, end, system), logprobs: true, top_logprobs: 5,
      ...samplingFields(fit.maxTokens) }, state.apiKey, signal)
    : streamCompletion({ prompt: apiPrompt(chat, fit.from, end), logprobs: 5, ...samplingFields(fit.maxTokens) },
      state.apiKey, signal);
  Object.assign(clock, { started: performance.now(), first: null, last: null, tokens: 0 });
  for await (const chunk of request) {
    if (chunk.id) reply.meta.id = chunk.id;
    if (chunk.usage) reply.meta.usage = chunk.usage;
    if (chunk.timings) reply.meta.timings = chunk.timings;
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) continue;
    const entries = state.model.chat ? choice.logprobs?.content || [] : chatLogprobs(choice.logprobs);
    const text = (state.model.chat ? choice.delta?.content : choice.text) || "";
    if (entries.length || text) {
      const now = performance.now();
      if (clock.first === null) clock.first = now;
      clock.last = now;
      clock.tokens += entries.length;
    }
    reply.meta.logprobs.push(...entries);
    if (text) {
      reply.content += text;
      body.textContent = reply.content;
      follower.follow();
    }
    if (choice.finish_reason) reply.meta.finish = choice.finish_reason;
  }
}

async function generate() {
  const chat = current();
  const end = chat.messages.length; // the reply's index
  const system = systemPrompt();
  const reply = { role: "assistant", content: "", meta: { state: "streaming", logprobs: [], system } };
  const maxTokens = numberSetting(state.settings.max_tokens);
  let fit = fitWindow(chat.messages, end, chat.from || 0, system, state.model.window, maxTokens);
  chat.messages.push(reply);
  const controller = new AbortController();
  state.busy = { controller };
  showError(null);
  setBusy(true);
  save();
  renderChats();
  renderMessages();
  follower.reset();
  const body = $("messages").lastElementChild.querySelector(".body");
  const clock = {};
  for (;;) {
    reply.meta.from = fit.from;
    try {
      await streamReply(chat, reply, fit, body, clock, controller.signal);
      reply.meta.state = "done";
    } catch (error) {
      if (error instanceof APIError && error.status === 503 && error.retryAfter && !reply.content) {
        // the model is still loading (or the queue is full): wait as the server asks, then send again
        body.textContent = `${error.message} (trying again in ${error.retryAfter} s…)`;
        if (await pause(error.retryAfter * 1000, controller.signal)) {
          body.textContent = "";
          await showModel(); // once loaded: its window, and whether it chats or completes text
          fit = fitWindow(chat.messages, end, chat.from || 0, systemPrompt(), state.model.window, maxTokens);
          reply.meta.system = systemPrompt();
          continue;
        }
        error = new DOMException("stopped", "AbortError");
      }
      const next = nextTurn(chat.messages, fit.from, end);
      if (error instanceof APIError && error.code === "context_length_exceeded" && !reply.content && next !== null) {
        fit = fitWindow(chat.messages, end, next, system, state.model.window, maxTokens); // the server's count decides
        continue;
      }
      if (error.name === "AbortError" && reply.content) {
        reply.meta.state = "stopped";
      } else if (error instanceof APIError && error.status === 401 && !reply.content) {
        chat.messages.splice(end, 1); // nothing was generated: ask for the key, then try again
        state.retry = generate;
        askForKey(error.message);
        finish();
        return;
      } else if (!reply.content) {
        withdraw(chat, end, error.name === "AbortError" ? null : error.message);
        finish();
        return;
      } else {
        reply.meta.state = "error"; // shown, never sent back as history
        reply.meta.error = error.message;
      }
    }
    break;
  }
  if (fit.from > (chat.from || 0)) {
    reply.meta.dropped = turnsBetween(chat.messages, chat.from || 0, fit.from);
    chat.from = fit.from;
  }
  measure(reply, clock);
  learnCosts(chat.messages, end);
  finish();
}

// Waits `ms` -> true, or false as soon as `signal` aborts (Stop).
function pause(ms, signal) {
  return new Promise((resolve) => {
    if (signal.aborted) { resolve(false); return; }
    const timer = setTimeout(() => resolve(true), ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(false); }, { once: true });
  });
}

// A reply that failed (or was stopped) before its first token: it goes, with the message it answered, whose text
// returns to the message box so nothing is lost and nothing broken is sent again.
function withdraw(chat, end, message) {
  chat.messages.splice(end, 1);
  const asked = chat.messages[end - 1];
  if (asked?.role === "user") {
    chat.messages.splice(end - 1, 1);
    if (!$("input").value.trim()) $("input").value = asked.content;
  }
  if (!chat.messages.length) chat.title = "";
  if (message) showError(message);
}

// Time to first token and tokens/s: the server's own clock (`timings`, from its first token to its last) where it
// sent one, else this page's from the first token received to the last, over usage's token count.
function measure(reply, clock) {
  const meta = reply.meta;
  const tokens = meta.usage ? meta.usage.completion_tokens : clock.tokens;
  if (tokens !== undefined) meta.tokens = tokens;
  if (clock.first === null || clock.first === undefined) return;
  meta.ttft = clock.first - clock.started;
  if (meta.timings && meta.timings.predicted_n > 1) {
    meta.tps = meta.timings.predicted_per_second;
  } else if (tokens > 1 && clock.last > clock.first) {
    meta.tps = (tokens - 1) / ((clock.last - clock.first) / 1000);
  }
}

function finish() {
  state.busy = null;
  setBusy(false);
  save();
  renderChats();
  renderMessages();
  follower.follow();
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

// What the model read for reply `index` and the reply itself: the messages (or, for a completion-only model, the
// text) from where that request started.
function inspectedSubject(chat, index) {
  const meta = chat.messages[index].meta || {};
  const from = meta.from ?? 0;
  return state.model.chat ? { messages: apiMessages(chat, from, index, meta.system ?? systemPrompt(), true) }
    : { prompt: apiPrompt(chat, from, index, true) };
}

function openInspector(index) {
  const chat = current();
  state.inspecting = { index, layer: state.inspecting?.layer ?? 0, head: state.inspecting?.head ?? 0, lens: null,
    subject: inspectedSubject(chat, index), heads: null };
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
    const body = { ...view.subject, layer: view.layer, head: view.head, summary: withSummary || !view.heads };
    const result = await postJSON("/v1/inspect/attention", body, state.apiKey);
    if (state.inspecting !== view) return;
    fillSelect($("pick-layer"), result.num_layers, result.layer);
    fillSelect($("pick-head"), result.num_heads, result.head);
    if (result.heads) view.heads = result.heads;
    drawAttention(canvas, $("attention-info"), result.tokens, result.attention, `layer ${result.layer}, head ${result.head}`);
    canvas.dataset.layer = String(result.layer);
    canvas.dataset.head = String(result.head);
    canvas.tokenIds = result.tokens.map((t) => t.id);
    drawHeadSummary();
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

function drawHeadSummary() {
  const view = state.inspecting;
  if (!view || !view.heads) return;
  for (const b of document.querySelectorAll("#heads-measure button")) {
    b.setAttribute("aria-selected", String(b.dataset.measure === state.headsMeasure));
  }
  drawHeads($("heads-canvas"), $("heads-info"), view.heads, state.headsMeasure, view, (layer, head) => {
    view.layer = layer;
    view.head = head;
    loadAttention(false);
  });
}

async function loadLens() {
  const view = state.inspecting;
  if (!view) return;
  const canvas = $("lens-canvas");
  if (view.lens) return;
  canvas.dataset.ready = "";
  status("tracing…");
  try {
    view.lens = await postJSON("/v1/inspect/lens", view.subject, state.apiKey);
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

// The served model: its name, its window (max_model_len) and whether it can chat (capabilities), shown in the
// header and the settings; asked again until the model has loaded.
async function showModel() {
  let card = null;
  try {
    card = (await getJSON("/v1/models", state.apiKey)).data[0];
  } catch (_) { /* the server is not there yet: asked again below */ }
  if (!card || !card.max_model_len) {
    clearTimeout(state.modelTimer);
    state.modelTimer = setTimeout(showModel, 2000);
    if (!card) return;
  }
  const window = card.max_model_len || null;
  const chat = card.capabilities ? card.capabilities.includes("chat") : true;
  const changed = state.model.chat !== chat;
  state.model = { id: card.id, window, chat };
  $("model-name").textContent = `· ${card.id}`
    + (window ? ` · ${window}-token window${chat ? "" : " · completes text"}` : " · loading the model…");
  if (window) {
    const room = Math.floor(window / 4);
    $("window-hint").textContent = `The model's window holds ${window} tokens: the conversation and the reply `
      + "together. With max tokens empty a reply may run to the end of the window. When a conversation outgrows it, "
      + `its oldest turns are no longer sent${chat ? " (the system prompt is)" : ""}, keeping ${room} tokens free `
      + "for the reply.";
    $("set-max-tokens").max = String(window - 1);
  }
  $("set-system").disabled = !chat;
  $("input").placeholder = chat ? "Message (Enter sends, Shift+Enter: new line)"
    : "Text for the model to continue (Enter sends, Shift+Enter: new line)";
  if (changed && !state.busy) renderMessages();
}

async function main() {
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
  for (const b of document.querySelectorAll("#heads-measure button")) {
    b.addEventListener("click", () => { state.headsMeasure = b.dataset.measure; drawHeadSummary(); });
  }
  follower = createFollower($("jump"), () => $("messages").lastElementChild, $("composer"));
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") hideTooltip(); });
  document.addEventListener("click", (e) => { if (!e.target.closest(".tok")) hideTooltip(); });
  for (const chat of state.chats) {
    for (const message of chat.messages) if (message.meta?.state === "streaming") message.meta.state = "stopped";
  }
  current();
  save();
  renderChats();
  renderMessages();
  await showModel();
  follower.follow();
  document.body.dataset.ready = "1";
}

main();
