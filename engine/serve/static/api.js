// The server's own HTTP API, as any client calls it: JSON requests, and the server-sent events of
// /v1/chat/completions and /v1/completions read from the fetch body (no EventSource: it cannot POST). An aborted
// fetch closes the connection, which makes the server cancel the sequence.

export class APIError extends Error {
  constructor(message, status, code = null, retryAfter = null) {
    super(message);
    this.name = "APIError";
    this.status = status;
    this.code = code; // OpenAI's error code, e.g. "context_length_exceeded"
    this.retryAfter = retryAfter; // seconds, from a 503's Retry-After (the model still loading, a full queue)
  }
}

function headers(apiKey) {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`, code = null;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
    if (body && body.error && body.error.code) code = body.error.code;
  } catch (_) { /* not JSON: keep the status line */ }
  const retryAfter = Number(response.headers.get("Retry-After")) || null;
  return new APIError(message, response.status, code, retryAfter);
}

export async function getJSON(path, apiKey) {
  const response = await fetch(path, { headers: headers(apiKey) });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

export async function postJSON(path, body, apiKey, signal) {
  const response = await fetch(path, { method: "POST", headers: headers(apiKey), body: JSON.stringify(body), signal });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// Yields each parsed `data:` event of a streamed chat completion until [DONE]; an error event throws APIError.
export function streamChat(body, apiKey, signal) {
  return streamEvents("/v1/chat/completions", body, apiKey, signal);
}

// The same for a text completion (/v1/completions: `prompt` instead of `messages`).
export function streamCompletion(body, apiKey, signal) {
  return streamEvents("/v1/completions", body, apiKey, signal);
}

async function* streamEvents(path, body, apiKey, signal) {
  const response = await fetch(path, {
    method: "POST", headers: headers(apiKey), body: JSON.stringify({ ...body, stream: true }), signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new APIError(chunk.error.message || "the server failed", 500);
      yield chunk;
    }
  }
}
