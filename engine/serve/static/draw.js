// Canvas pictures of the inspection endpoints' numbers: an attention head's query x key map, the whole model's head
// summary, and the logit lens table. Each canvas keeps the numbers it shows (`canvas.values`, rows x columns, as the
// API sent them) and its size in data-rows / data-cols; hovering or tapping a cell describes it in `info`.

export const MASKED = "#c8c8c8";
export const CLIPPED = "#e4572e";
const FONT = "11px system-ui, sans-serif";

// A token as a short one-line label.
export function label(token, max = 12) {
  let text = token.piece ?? token.text ?? "";
  text = text.replace(/▁/g, "␣").replace(/\n/g, "↵");
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

// White (0) to deep blue (1).
export function blue(v) {
  const t = Math.max(0, Math.min(1, v));
  const r = Math.round(255 - t * (255 - 20)), g = Math.round(255 - t * (255 - 60)), b = Math.round(255 - t * (255 - 150));
  return `rgb(${r}, ${g}, ${b})`;
}

function setup(canvas, width, height) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.ceil(width * ratio);
  canvas.height = Math.ceil(height * ratio);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.font = FONT;
  ctx.textBaseline = "middle";
  return ctx;
}

function onCell(canvas, info, geometry, describe) {
  const handler = (event) => {
    const box = canvas.getBoundingClientRect();
    const x = event.clientX - box.left, y = event.clientY - box.top;
    const hit = geometry(x, y);
    info.textContent = hit ? describe(...hit) : "";
  };
  canvas.onmousemove = handler;
  canvas.onclick = handler;
}

// values: T x T (row q: query, column k: key); cells with k > q are masked. The scale stops at the largest weight
// outside key 0; key-0 cells above it are drawn in CLIPPED.
export function drawAttention(canvas, info, tokens, values, caption) {
  const t = values.length;
  const room = Math.max(200, (canvas.parentElement?.clientWidth || 720) - 16);
  let cell = Math.min(22, Math.floor((room - 90) / t)); // with room for token labels
  const labels = cell >= 7;
  if (!labels) cell = Math.max(3, Math.min(22, Math.floor(room / t)));
  const margin = labels ? 90 : 8;
  const size = t * cell;
  const ctx = setup(canvas, margin + size + 8, margin + size + 8);
  ctx.font = `${Math.min(11, cell + 1)}px system-ui, sans-serif`;
  let scale = 0;
  for (let q = 0; q < t; q++) for (let k = 1; k <= q; k++) scale = Math.max(scale, values[q][k]);
  if (scale <= 0) scale = 1;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, margin + size + 8, margin + size + 8);
  for (let q = 0; q < t; q++) {
    for (let k = 0; k < t; k++) {
      const v = values[q][k];
      ctx.fillStyle = k > q ? MASKED : (v > scale ? CLIPPED : blue(v / scale));
      ctx.fillRect(margin + k * cell, margin + q * cell, cell, cell);
    }
  }
  if (labels) {
    ctx.fillStyle = "#1d1d1f";
    ctx.textAlign = "right";
    tokens.forEach((token, i) => ctx.fillText(label(token), margin - 4, margin + i * cell + cell / 2));
    ctx.save();
    ctx.textAlign = "left";
    tokens.forEach((token, i) => {
      ctx.save();
      ctx.translate(margin + i * cell + cell / 2, margin - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.fillText(label(token), 0, 0);
      ctx.restore();
    });
    ctx.restore();
  }
  canvas.values = values;
  canvas.dataset.rows = String(t);
  canvas.dataset.cols = String(t);
  canvas.dataset.cell = String(cell);
  canvas.dataset.margin = String(margin);
  canvas.dataset.caption = caption;
  onCell(canvas, info, (x, y) => {
    const k = Math.floor((x - margin) / cell), q = Math.floor((y - margin) / cell);
    return q >= 0 && k >= 0 && q < t && k < t ? [q, k] : null;
  }, (q, k) => (k > q
    ? `query ${q} ${JSON.stringify(tokens[q].piece)} cannot see key ${k} (a later token: masked)`
    : `query ${q} ${JSON.stringify(tokens[q].piece)} → key ${k} ${JSON.stringify(tokens[k].piece)}: ${values[q][k].toFixed(4)}`));
}

// heads: {to_first, to_previous, entropy}, each layers x heads. Three maps side by side; clicking a cell calls
// pick(layer, head).
export function drawHeads(canvas, info, heads, pick) {
  const maps = [["to first token", heads.to_first, 1], ["to previous", heads.to_previous, 1],
    ["entropy (nats)", heads.entropy, Math.max(1e-9, ...heads.entropy.flat())]];
  const layers = heads.to_first.length, n = heads.to_first[0].length;
  const cell = Math.max(6, Math.min(18, Math.floor(220 / Math.max(n, layers))));
  const gap = 30, top = 22, left = 26;
  const mapWidth = n * cell;
  const width = left + maps.length * (mapWidth + gap), height = top + layers * cell + 8;
  const ctx = setup(canvas, width, height);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  maps.forEach(([title, grid, top_value], m) => {
    const x0 = left + m * (mapWidth + gap);
    ctx.fillStyle = "#1d1d1f";
    ctx.textAlign = "left";
    ctx.fillText(title, x0, 10);
    for (let l = 0; l < layers; l++) {
      for (let h = 0; h < n; h++) {
        ctx.fillStyle = blue(grid[l][h] / top_value);
        ctx.fillRect(x0 + h * cell, top + l * cell, cell - 1, cell - 1);
      }
    }
  });
  ctx.fillStyle = "#6b6b70";
  ctx.textAlign = "right";
  for (let l = 0; l < layers; l++) if (cell >= 10 || l % 4 === 0) ctx.fillText(String(l), left - 4, top + l * cell + cell / 2);
  canvas.values = heads;
  canvas.dataset.rows = String(layers);
  canvas.dataset.cols = String(n);
  const geometry = (x, y) => {
    const m = Math.floor((x - left) / (mapWidth + gap));
    const h = Math.floor((x - left - m * (mapWidth + gap)) / cell), l = Math.floor((y - top) / cell);
    return m >= 0 && m < maps.length && h >= 0 && h < n && l >= 0 && l < layers ? [l, h] : null;
  };
  onCell(canvas, info, geometry, (l, h) => `layer ${l}, head ${h}: to first token ${heads.to_first[l][h].toFixed(3)}, `
    + `to previous ${heads.to_previous[l][h].toFixed(3)}, entropy ${heads.entropy[l][h].toFixed(3)} nats (click: show it)`);
  canvas.onclick = (event) => {
    const box = canvas.getBoundingClientRect();
    const hit = geometry(event.clientX - box.left, event.clientY - box.top);
    if (hit) pick(...hit);
  };
}

// lens: the /v1/inspect/lens body. Rows: embeddings, after each layer (the last: the model's output); the last
// `shown` positions as columns; each cell the top token, coloured by its probability, framed where it is the real
// next token.
export function drawLens(canvas, info, lens, shown = 32) {
  const t = lens.tokens.length, rows = lens.rows.length;
  const first = Math.max(0, t - shown);
  const cols = t - first;
  const cw = 78, ch = 22, left = 92, top = 44;
  const width = left + cols * cw + 8, height = top + rows * ch + 8;
  const ctx = setup(canvas, width, height);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  ctx.textAlign = "center";
  for (let c = 0; c < cols; c++) {
    const pos = first + c;
    ctx.fillStyle = "#1d1d1f";
    ctx.fillText(label(lens.tokens[pos], 10), left + c * cw + cw / 2, 12);
    ctx.fillStyle = "#6b6b70";
    ctx.fillText(pos + 1 < t ? `→ ${label(lens.tokens[pos + 1], 8)}` : "→ ?", left + c * cw + cw / 2, 30);
  }
  ctx.textAlign = "right";
  lens.rows.forEach((name, r) => {
    ctx.fillStyle = "#1d1d1f";
    ctx.fillText(name === `layer ${rows - 2}` ? `${name} (out)` : name, left - 6, top + r * ch + ch / 2);
  });
  ctx.textAlign = "center";
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const pos = first + c;
      const x = left + c * cw, y = top + r * ch;
      ctx.fillStyle = blue(lens.top_probs[r][pos] * 0.85);
      ctx.fillRect(x, y, cw - 1, ch - 1);
      const isNext = pos + 1 < t && lens.top_ids[r][pos] === lens.tokens[pos + 1].id;
      if (isNext) {
        ctx.strokeStyle = CLIPPED;
        ctx.lineWidth = 2;
        ctx.strokeRect(x + 1, y + 1, cw - 3, ch - 3);
      }
      ctx.fillStyle = lens.top_probs[r][pos] > 0.55 ? "#fff" : "#1d1d1f";
      ctx.font = isNext ? `bold ${FONT}` : FONT;
      ctx.fillText(label({ piece: lens.top_pieces[r][pos] }, 10), x + cw / 2, y + ch / 2);
    }
  }
  canvas.values = lens.top_ids.map((row) => row.slice(first));
  canvas.dataset.rows = String(rows);
  canvas.dataset.cols = String(cols);
  canvas.dataset.first = String(first);
  onCell(canvas, info, (x, y) => {
    const c = Math.floor((x - left) / cw), r = Math.floor((y - top) / ch);
    return r >= 0 && c >= 0 && r < rows && c < cols ? [r, first + c] : null;
  }, (r, pos) => `${lens.rows[r]}, position ${pos} ${JSON.stringify(lens.tokens[pos].piece)}: top `
    + `${JSON.stringify(lens.top_pieces[r][pos])} ${(100 * lens.top_probs[r][pos]).toFixed(2)}%`
    + (pos + 1 < t ? `; the real next token ${JSON.stringify(lens.tokens[pos + 1].piece)} `
      + `${(100 * lens.next_probs[r][pos]).toFixed(2)}%` : ""));
}
