// A reply's tokens coloured by the probability the model gave them, with the top alternatives on hover, focus or
// tap. The numbers are the API's own (`logprobs.content[i].logprob` and `top_logprobs`); every text goes in as text.

// How a token's text is shown: visible marks for text that would not show (EOS's empty text, a lone newline).
export function shownToken(text) {
  if (text === "") return "∅";
  if (text.startsWith("bytes:")) return text.slice(6);
  return text.replace(/\n/g, "↵\n").replace(/\t/g, "⇥");
}

export function probabilityColour(p) {
  const hue = Math.round(120 * Math.max(0, Math.min(1, p))); // red (unlikely) .. green (likely)
  return `hsl(${hue}, 75%, 84%)`;
}

// A probability as a percentage: two decimals, or two significant digits below 0.01%.
export function percent(logprob) {
  const p = 100 * Math.exp(logprob);
  return `${p >= 0.01 ? p.toFixed(2) : p.toPrecision(2)}%`;
}

// The token spans of one reply, in a fragment.
export function tokenSpans(logprobs) {
  const fragment = document.createDocumentFragment();
  logprobs.forEach((entry, i) => {
    const span = document.createElement("span");
    span.className = "tok";
    if (entry.token === "") span.classList.add("special");
    span.tabIndex = 0;
    span.dataset.index = String(i);
    span.dataset.logprob = String(entry.logprob);
    span.textContent = shownToken(entry.token);
    span.style.backgroundColor = probabilityColour(Math.exp(entry.logprob));
    fragment.append(span);
  });
  return fragment;
}

export function legend() {
  const p = document.createElement("div");
  p.className = "prob-legend";
  p.textContent = "Background: the probability of each token (red: unlikely, green: likely). Hover or tap a token "
    + "for the 5 most likely tokens at that place.";
  return p;
}

// Fill the tooltip with one token's alternatives and place it under the token.
export function showTooltip(tooltip, span, entry) {
  tooltip.replaceChildren();
  const head = document.createElement("div");
  head.className = "tip-head";
  head.textContent = `token ${Number(span.dataset.index) + 1}: ${percent(entry.logprob)}`;
  const table = document.createElement("table");
  const tops = entry.top_logprobs || [];
  let chosenListed = false;
  for (const alt of tops) {
    const row = table.insertRow();
    row.className = "alt";
    row.dataset.token = alt.token;
    row.dataset.logprob = String(alt.logprob);
    if (alt.token === entry.token) { row.classList.add("chosen"); chosenListed = true; }
    const token = row.insertCell();
    token.className = "alt-token";
    token.textContent = JSON.stringify(alt.token); // quoted: spaces and newlines show
    const prob = row.insertCell();
    prob.className = "alt-prob";
    prob.textContent = percent(alt.logprob);
  }
  tooltip.append(head, table);
  if (!chosenListed) {
    const note = document.createElement("div");
    note.className = "tip-head";
    note.textContent = `chosen ${JSON.stringify(entry.token)} (${percent(entry.logprob)}) is not in the top ${tops.length}`;
    tooltip.append(note);
  }
  tooltip.hidden = false;
  const box = span.getBoundingClientRect();
  const width = tooltip.offsetWidth;
  const left = Math.max(4, Math.min(window.scrollX + box.left, window.scrollX + document.documentElement.clientWidth - width - 4));
  tooltip.style.left = `${left}px`;
  tooltip.style.top = `${window.scrollY + box.bottom + 4}px`;
}
