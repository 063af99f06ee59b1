// What a conversation sends, and how it stays inside the model's window as it grows: the oldest turns are left out
// (the system prompt stays), as `tinyllama chat` does, keeping room for the reply. The page cannot tokenize, so it
// counts with the server's own numbers: each reply's `usage` (exact prompt and completion tokens), the cost of each
// user message as the difference between two consecutive prompts, and, for text it has no count for yet, the
// characters per token measured on this conversation's replies. The server stays the judge: a request it still
// finds too long (400 context_length_exceeded) is sent again with one more turn left out.

export const GLUE = 10; // tokens a chat template adds around one message (role markers, end of turn), at least
export const MARGIN = 8; // tokens kept free beyond the reply's room, for the estimate's error
const DEFAULT_CHARS_PER_TOKEN = 2.5; // before any reply was measured (low: estimates err on the long side)

// Whether a message goes back to the model: never a failed or empty reply, nor the message it answered.
function isSendableReply(message) {
  return message.role === "assistant" && message.content !== "" && message.meta?.state !== "error";
}

// Indices of the messages in [from, end) that are sent: user / assistant turns, minus failed or empty replies and
// the user messages they answered.
export function sendable(messages, from, end) {
  const out = [];
  for (let i = from; i < end; i++) {
    const m = messages[i];
    if (m.role === "assistant") {
      if (isSendableReply(m)) out.push(i);
      else if (out.length && out[out.length - 1] === i - 1 && messages[i - 1].role === "user") out.pop();
    } else {
      out.push(i);
    }
  }
  return out;
}

// Characters per token on this conversation's replies (their text and exact completion_tokens).
export function charsPerToken(messages) {
  let chars = 0, tokens = 0;
  for (const m of messages) {
    const n = m.meta?.usage?.completion_tokens;
    if (m.role === "assistant" && n && m.content) { chars += m.content.length; tokens += n; }
  }
  return tokens >= 8 ? Math.max(0.5, chars / tokens) : DEFAULT_CHARS_PER_TOKEN;
}

// The tokens a template adds around a user message on this model: the most any measured user message cost beyond
// its characters' estimate (GLUE at least).
function glueOf(messages, cpt) {
  let glue = GLUE;
  for (const m of messages) {
    if (m.role === "user" && m.tokens !== undefined) glue = Math.max(glue, m.tokens - Math.ceil(m.content.length / cpt));
  }
  return glue;
}

export function estimateText(text, cpt, glue = GLUE) {
  return text ? Math.ceil(text.length / cpt) + glue : 0;
}

// A message's tokens in the prompt: a reply's completion_tokens, a user message's measured cost (set by
// learnCosts), else an estimate from its characters (null with `exact`).
function cost(message, cpt, glue = GLUE, exact = false) {
  if (message.role === "assistant" && message.meta?.usage) return message.meta.usage.completion_tokens;
  if (message.tokens !== undefined) return message.tokens;
  return exact ? null : estimateText(message.content, cpt, glue);
}

// After reply `index` got its usage, the user message it answered gets its measured cost: this prompt minus the
// previous reply's prompt and completion, plus what that request sent that this one left out (when all of that is
// measured and both had the same system prompt).
export function learnCosts(messages, index) {
  const reply = messages[index];
  const usage = reply.meta?.usage;
  if (!usage || index < 1 || messages[index - 1].role !== "user") return;
  const earlier = sendable(messages, 0, index - 1).filter((i) => messages[i].role === "assistant");
  const previous = earlier.length ? messages[earlier[earlier.length - 1]] : null;
  const from = reply.meta.from ?? 0;
  if (!previous?.meta?.usage || (previous.meta.from ?? 0) > from || previous.meta.system !== reply.meta.system) return;
  let left = 0;
  for (const i of sendable(messages, previous.meta.from ?? 0, from)) {
    const c = cost(messages[i], 1, GLUE, true);
    if (c === null) return;
    left += c;
  }
  messages[index - 1].tokens = usage.prompt_tokens - previous.meta.usage.prompt_tokens
    - previous.meta.usage.completion_tokens + left;
}

// The prompt's tokens when the messages in [from, end) are sent with `system`: the last sent reply's exact count
// (prompt + completion) as the anchor, minus what it was sent with that is now left out, plus what came after it.
export function promptEstimate(messages, from, end, system) {
  const cpt = charsPerToken(messages);
  const glue = glueOf(messages, cpt);
  const sent = sendable(messages, from, end);
  let anchor = -1;
  for (let k = sent.length - 1; k >= 0; k--) {
    const m = messages[sent[k]];
    if (m.role === "assistant" && m.meta?.usage && (m.meta.from ?? 0) <= from) { anchor = k; break; }
  }
  if (anchor < 0) {
    return estimateText(system, cpt, glue) + glue + sent.reduce((sum, i) => sum + cost(messages[i], cpt, glue), 0);
  }
  const a = messages[sent[anchor]];
  let total = a.meta.usage.prompt_tokens + a.meta.usage.completion_tokens;
  for (const i of sendable(messages, a.meta.from ?? 0, from)) total -= cost(messages[i], cpt, glue);
  if ((a.meta.system || "") !== (system || "")) {
    total += estimateText(system, cpt, glue) - estimateText(a.meta.system, cpt, glue);
  }
  for (const i of sent.slice(anchor + 1)) total += cost(messages[i], cpt, glue);
  return total;
}

// The next turn's start after `from`: the index of the next sent user message before `end` (the newest one
// included), or null.
export function nextTurn(messages, from, end) {
  const sent = sendable(messages, from, end);
  const next = sent.find((i) => i > from && messages[i].role === "user");
  return next === undefined ? null : next;
}

// What to send for the reply that will follow messages[0 .. end): the start `from` (at least `minFrom`; earlier
// turns left out until the prompt and the reply's room fit the window), the estimated prompt tokens, and max_tokens
// (the user's setting clamped to what fits; null: none, the server's default is the rest of the window). The room
// kept for a reply is the setting, at most a quarter of the window (tinyllama chat's rule).
export function fitWindow(messages, end, minFrom, system, window, maxTokens) {
  let from = minFrom;
  let estimate = promptEstimate(messages, from, end, system);
  if (!window) return { from, estimate, maxTokens: maxTokens || null };
  const room = Math.max(1, Math.min(maxTokens || Infinity, Math.floor(window / 4)));
  while (estimate + room + MARGIN > window) {
    const next = nextTurn(messages, from, end); // at most up to the newest user message, which always stays
    if (next === null) break; // nothing left to leave out: the server judges
    from = next;
    estimate = promptEstimate(messages, from, end, system);
  }
  const clamped = maxTokens ? Math.max(1, Math.min(maxTokens, window - estimate - MARGIN)) : null;
  return { from, estimate, maxTokens: clamped };
}

// How many user turns lie in [from, to): the turns a request leaves out that the previous one sent.
export function turnsBetween(messages, from, to) {
  return sendable(messages, from, to).filter((i) => messages[i].role === "user").length;
}

// A completion-only model's text: the parts in order, each user part on a new line after a reply unless it starts
// the text or the text already ends in whitespace; a reply continues the text exactly.
export function joinedText(parts) {
  let text = "";
  for (const part of parts) {
    if (part.role === "user" && text && !/\s$/.test(text)) text += "\n";
    text += part.content;
  }
  return text;
}
