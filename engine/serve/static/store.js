// What the page keeps in the browser (localStorage): the conversations, the settings and the API key.

const CHATS = "tinyllama.chats";
const CURRENT = "tinyllama.current";
const SETTINGS = "tinyllama.settings";
const KEY = "tinyllama.apiKey";

// max_tokens empty: none is sent, and the server lets a reply run to the end of the window.
export const DEFAULT_SETTINGS = { system: "", temperature: 0.7, top_p: 0.95, top_k: 0, max_tokens: "", seed: "" };

function read(name, fallback) {
  try {
    const raw = localStorage.getItem(name);
    return raw === null ? fallback : JSON.parse(raw);
  } catch (_) {
    return fallback;
  }
}

function write(name, value) {
  try {
    localStorage.setItem(name, JSON.stringify(value));
    return true;
  } catch (_) {
    return false; // full (or disabled): the page keeps working, unsaved
  }
}

export function loadSettings() {
  return { ...DEFAULT_SETTINGS, ...read(SETTINGS, {}) };
}

export function saveSettings(settings) {
  write(SETTINGS, settings);
}

export function loadKey() {
  return read(KEY, "") || "";
}

export function saveKey(key) {
  write(KEY, key);
}

export function newChat() {
  return { id: `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`, title: "", messages: [] };
}

export function loadChats() {
  const chats = read(CHATS, []);
  return Array.isArray(chats) ? chats : [];
}

export function loadCurrent() {
  return read(CURRENT, null);
}

// Saves every chat; when the browser's quota is full, the per-token probabilities of the oldest replies go first.
export function saveChats(chats, currentId) {
  write(CURRENT, currentId);
  if (write(CHATS, chats)) return;
  for (const chat of chats) {
    for (const message of chat.messages) {
      if (message.meta && message.meta.logprobs) {
        delete message.meta.logprobs;
        if (write(CHATS, chats)) return;
      }
    }
  }
}
