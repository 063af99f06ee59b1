// Canvas pictures of the inspection endpoints' numbers: an attention head's query x key map, the whole model's head
// summary, and the logit lens table. Each has labelled axes and a colour legend with values. Layers run upward in
// all of them, the output at the top, as in `tinyllama inspect heads|lens`'s PNGs (engine/inspect/plots.py).
// Each canvas keeps the numbers it shows (`canvas.values`, as the API sent them) and its size in data-rows /
// data-cols; hovering or tapping a cell describes it in `info`.

export const MASKED = "#c8c8c8";
export const CLIPPED = "#e4572e";
const FRAME = "#f2a900"; // the lens's real next token, the head shown (as in the PNGs)
const INK = "#1d1d1f", MUTED = "#6b6b70";
const FONT = "11px system-ui, sans-serif";
const CELL_FONT = "10px system-ui, sans-serif";

// A token as a short one-line label.
export function label(token, max = 12) {
  let text = token.piece ?? token.text ?? "";
  text = text.replace(/▁/g, "␣").replace(/\n/g, "↵");
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

// White (0) to deep blue (1): the attention heatmap's scale.
export function blue(v) {
  const t = Math.max(0, Math.min(1, v));
  const r = Math.round(255 - t * (255 - 20)), g = Math.round(255 - t * (255 - 60)), b = Math.round(255 - t * (255 - 150));
  return `rgb(${r}, ${g}, ${b})`;
}

// matplotlib's "Blues" (ColorBrewer's nine steps, linear between them): the lens's and the head summary's scale,
// the same as the lens PNG's.
const BLUES = [[247, 251, 255], [222, 235, 247], [198, 219, 239], [158, 202, 225], [107, 174, 214], [66, 146, 198],
  [33, 113, 181], [8, 81, 156], [8, 48, 107]];
export function blues(v) {
  const t = Math.max(0, Math.min(1, v)) * (BLUES.length - 1);
  const i = Math.min(BLUES.length - 2, Math.floor(t)), f = t - i;
  const [r, g, b] = BLUES[i].map((c, k) => Math.round(c + f * (BLUES[i + 1][k] - c)));
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
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  return ctx;
}

let measurer = null;
function textWidth(value, font = FONT) {
  measurer = measurer || document.createElement("canvas").getContext("2d");
  measurer.font = font;
  return Math.ceil(measurer.measureText(value).width);
}

function roomOf(canvas) {
  return Math.max(200, (canvas.parentElement?.clientWidth || 720) - 16);
}

function text(ctx, value, x, y, align = "left", colour = INK, font = FONT) {
  ctx.font = font;
  ctx.fillStyle = colour;
  ctx.textAlign = align;
  ctx.fillText(value, x, y);
}

function verticalText(ctx, value, x, y) {
  ctx.save();
  ctx.translate(x, y);
  ctx.rotate(-Math.PI / 2);
  text(ctx, value, 0, 0, "center", MUTED);
  ctx.restore();
}

// A horizontal colour bar at (x, y): `colour(t)` for t in 0..1, a tick and its value under it at each of `ticks`
// ([t, text]), the title on its right. Returns its height.
export const LEGEND_HEIGHT = 30;
function drawLegend(ctx, x, y, width, colour, ticks, title) {
  for (let i = 0; i < width; i++) {
    ctx.fillStyle = colour(i / (width - 1));
    ctx.fillRect(x + i, y, 1, 10);
  }
  ctx.strokeStyle = "#999";
  ctx.lineWidth = 1;
  ctx.strokeRect(x + 0.5, y + 0.5, width - 1, 9);
  for (const [t, value] of ticks) {
    const tx = x + t * (width - 1);
    ctx.fillStyle = MUTED;
    ctx.fillRect(Math.round(tx), y + 10, 1, 4);
    text(ctx, value, tx, y + 21, t === 0 ? "left" : t === 1 ? "right" : "center", MUTED);
  }
  text(ctx, title, x + width + 10, y + 5, "left", MUTED);
  return LEGEND_HEIGHT;
}

function number(v, digits = 3) {
  return String(Number(v.toFixed(digits)));
}

function onCell(canvas, info, geometry, describe) {
  const handler = (event) => {
    const box = canvas.getBoundingClientRect();
    const hit = geometry(event.clientX - box.left, event.clientY - box.top);
    info.textContent = hit ? describe(...hit) : "";
  };
  canvas.onmousemove = handler;
  canvas.onclick = handler;
}

// values: T x T (row q: query, column k: key); cells with k > q are masked. The scale stops at the largest weight
// outside key 0; key-0 cells above it are drawn in CLIPPED.
export function drawAttention(canvas, info, tokens, values, caption) {
  const t = values.length;
  const room = roomOf(canvas);
  let cell = Math.min(22, Math.floor((room - 90) / t)); // with room for token labels
  const labels = cell >= 7;
  if (!labels) cell = Math.max(3, Math.min(22, Math.floor(room / t)));
  const margin = labels ? 90 : 8;
  const size = t * cell;
  const legendWidth = 200, legendTitle = "attention weight (red: above the scale)";
  const width = Math.max(margin + size + 8, margin + legendWidth + 18 + textWidth(legendTitle)), height = margin + size + 12 + LEGEND_HEIGHT + 18;
  const ctx = setup(canvas, width, height);
  ctx.font = `${Math.min(11, cell + 1)}px system-ui, sans-serif`;
  let scale = 0;
  for (let q = 0; q < t; q++) for (let k = 1; k <= q; k++) scale = Math.max(scale, values[q][k]);
  if (scale <= 0) scale = 1;
  for (let q = 0; q < t; q++) {
    for (let k = 0; k < t; k++) {
      const v = values[q][k];
      ctx.fillStyle = k > q ? MASKED : (v > scale ? CLIPPED : blue(v / scale));
      ctx.fillRect(margin + k * cell, margin + q * cell, cell, cell);
    }
  }
  if (labels) {
    const small = `${Math.min(11, cell + 1)}px system-ui, sans-serif`;
    tokens.forEach((token, i) => text(ctx, label(token), margin - 4, margin + i * cell + cell / 2, "right", INK, small));
    tokens.forEach((token, i) => {
      ctx.save();
      ctx.translate(margin + i * cell + cell / 2, margin - 4);
      ctx.rotate(-Math.PI / 2);
      text(ctx, label(token), 0, 0, "left", INK, small);
      ctx.restore();
    });
    text(ctx, "key →", 4, 10, "left", MUTED);
    text(ctx, "query ↓", 4, 24, "left", MUTED);
  }
  drawLegend(ctx, margin, margin + size + 12, legendWidth, (x) => blue(x),
    [[0, "0"], [0.5, number(scale / 2)], [1, number(scale)]], legendTitle);
  canvas.values = values;
  canvas.dataset.rows = String(t);
  canvas.dataset.cols = String(t);
  canvas.dataset.cell = String(cell);
  canvas.dataset.margin = String(margin);
  canvas.dataset.scale = String(scale);
  canvas.dataset.caption = caption;
  onCell(canvas, info, (x, y) => {
    const k = Math.floor((x - margin) / cell), q = Math.floor((y - margin) / cell);
    return q >= 0 && k >= 0 && q < t && k < t ? [q, k] : null;
  }, (q, k) => (k > q
    ? `query ${q} ${JSON.stringify(tokens[q].piece)} cannot see key ${k} (a later token: masked)`
    : `query ${q} ${JSON.stringify(tokens[q].piece)} → key ${k} ${JSON.stringify(tokens[k].piece)}: ${values[q][k].toFixed(4)}`));
}

export const HEAD_MEASURES = {
  to_first: "attention to the first token",
  to_previous: "attention to the previous token",
  entropy: "row entropy (nats)",
};

// heads: {to_first, to_previous, entropy}, each layers x heads. One measure as a layers x heads map, the last layer
// at the top, each cell with its value; `shown` ({layer, head}) framed; clicking a cell calls pick(layer, head).
export function drawHeads(canvas, info, heads, measure, shown, pick) {
  const grid = heads[measure];
  const layers = grid.length, n = grid[0].length;
  const top_value = measure === "entropy" ? Math.max(0.5, Math.ceil(2 * Math.max(...grid.flat())) / 2) : 1;
  const left = 78, top = 36, ch = 20;
  const cw = Math.max(30, Math.min(44, Math.floor((roomOf(canvas) - left - 8) / n)));
  const legendWidth = Math.min(240, Math.max(160, n * cw));
  const width = Math.max(left + n * cw + 8, left + legendWidth + 18 + textWidth(HEAD_MEASURES[measure]));
  const legendY = top + layers * ch + 14;
  const ctx = setup(canvas, width, legendY + LEGEND_HEIGHT + 4);
  const rowOf = (l) => layers - 1 - l; // the last layer on the top row
  text(ctx, `head → (${HEAD_MEASURES[measure]})`, left, 9, "left", MUTED);
  for (let h = 0; h < n; h++) text(ctx, String(h), left + h * cw + cw / 2, top - 9, "center", MUTED);
  verticalText(ctx, "layer (output at the top)", 9, top + (layers * ch) / 2);
  for (let l = 0; l < layers; l++) {
    const y = top + rowOf(l) * ch;
    text(ctx, `layer ${l}`, left - 6, y + ch / 2, "right", INK);
    for (let h = 0; h < n; h++) {
      const t = grid[l][h] / top_value;
      ctx.fillStyle = blues(t);
      ctx.fillRect(left + h * cw, y, cw - 1, ch - 1);
      text(ctx, grid[l][h].toFixed(2), left + h * cw + (cw - 1) / 2, y + ch / 2, "center", t > 0.55 ? "#fff" : INK,
        CELL_FONT);
    }
  }
  if (shown && shown.layer < layers && shown.head < n) {
    ctx.strokeStyle = FRAME;
    ctx.lineWidth = 2;
    ctx.strokeRect(left + shown.head * cw + 1, top + rowOf(shown.layer) * ch + 1, cw - 3, ch - 3);
  }
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((t) => [t, number(t * top_value, 2)]);
  drawLegend(ctx, left, legendY, legendWidth, blues, ticks, HEAD_MEASURES[measure]);
  canvas.values = heads;
  canvas.dataset.rows = String(layers);
  canvas.dataset.cols = String(n);
  canvas.dataset.measure = measure;
  canvas.dataset.cellWidth = String(cw);
  canvas.dataset.cellHeight = String(ch);
  canvas.dataset.left = String(left);
  canvas.dataset.top = String(top);
  const geometry = (x, y) => {
    const h = Math.floor((x - left) / cw), r = Math.floor((y - top) / ch);
    return h >= 0 && h < n && r >= 0 && r < layers ? [layers - 1 - r, h] : null;
  };
  onCell(canvas, info, geometry, (l, h) => `layer ${l}, head ${h}: to first token ${heads.to_first[l][h].toFixed(3)}, `
    + `to previous ${heads.to_previous[l][h].toFixed(3)}, entropy ${heads.entropy[l][h].toFixed(3)} nats (click: show it)`);
  canvas.onclick = (event) => {
    const box = canvas.getBoundingClientRect();
    const hit = geometry(event.clientX - box.left, event.clientY - box.top);
    if (hit) pick(...hit);
  };
}

// The lens's row names, as the PNG labels them: "embeddings", "after layer 0", ..., the last one the output.
function lensRowName(name, r, rows) {
  if (name === "embeddings") return name;
  return `after ${name}${r === rows - 1 ? " (output)" : ""}`;
}

// lens: the /v1/inspect/lens body. Rows (embeddings, after each layer; the last is the model's output) from the
// bottom up, the output on top; the last `shown` positions as columns, their input tokens along the bottom and the
// real next tokens along the top; each cell the top token, coloured by its probability, framed where it is the
// real next token. The same picture as `tinyllama inspect lens`'s PNG.
export function drawLens(canvas, info, lens, shown = 32) {
  const t = lens.tokens.length, rows = lens.rows.length;
  const first = Math.max(0, t - shown);
  const cols = t - first;
  const cw = 78, ch = 22, left = 150, top = 40;
  const gridBottom = top + rows * ch;
  const legendY = gridBottom + 46;
  const legendTitle = "probability of the top token (framed, bold: it is the real next token)";
  const width = Math.max(left + cols * cw + 8, left + 258 + textWidth(legendTitle)), height = legendY + LEGEND_HEIGHT + 4;
  const ctx = setup(canvas, width, height);
  const rowOf = (r) => rows - 1 - r; // the output (the last row) on top
  text(ctx, "real next token", left, 9, "left", MUTED);
  text(ctx, "input token at each position", left, gridBottom + 32, "left", MUTED);
  verticalText(ctx, "layer (output at the top)", 9, top + (rows * ch) / 2);
  for (let c = 0; c < cols; c++) {
    const pos = first + c, x = left + c * cw + cw / 2;
    text(ctx, pos + 1 < t ? label(lens.tokens[pos + 1], 10) : "?", x, top - 10, "center", INK);
    text(ctx, label(lens.tokens[pos], 10), x, gridBottom + 12, "center", INK);
  }
  lens.rows.forEach((name, r) => text(ctx, lensRowName(name, r, rows), left - 6, top + rowOf(r) * ch + ch / 2, "right"));
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const pos = first + c;
      const x = left + c * cw, y = top + rowOf(r) * ch;
      const p = lens.top_probs[r][pos];
      ctx.fillStyle = blues(p);
      ctx.fillRect(x, y, cw - 1, ch - 1);
      const isNext = pos + 1 < t && lens.top_ids[r][pos] === lens.tokens[pos + 1].id;
      if (isNext) {
        ctx.strokeStyle = FRAME;
        ctx.lineWidth = 2;
        ctx.strokeRect(x + 1, y + 1, cw - 3, ch - 3);
      }
      text(ctx, label({ piece: lens.top_pieces[r][pos] }, 10), x + cw / 2, y + ch / 2, "center",
        p > 0.55 ? "#fff" : INK, isNext ? `bold ${FONT}` : FONT);
    }
  }
  drawLegend(ctx, left, legendY, 240, blues, [0, 0.25, 0.5, 0.75, 1].map((v) => [v, String(v)]), legendTitle);
  canvas.values = lens.top_ids.map((row) => row.slice(first)); // the API's row order
  canvas.dataset.rows = String(rows);
  canvas.dataset.cols = String(cols);
  canvas.dataset.first = String(first);
  canvas.dataset.left = String(left);
  canvas.dataset.top = String(top);
  canvas.dataset.cellWidth = String(cw);
  canvas.dataset.cellHeight = String(ch);
  onCell(canvas, info, (x, y) => {
    const c = Math.floor((x - left) / cw), r = Math.floor((y - top) / ch);
    return r >= 0 && c >= 0 && r < rows && c < cols ? [rows - 1 - r, first + c] : null;
  }, (r, pos) => `${lensRowName(lens.rows[r], r, rows)}, position ${pos} ${JSON.stringify(lens.tokens[pos].piece)}: top `
    + `${JSON.stringify(lens.top_pieces[r][pos])} ${(100 * lens.top_probs[r][pos]).toFixed(2)}%`
    + (pos + 1 < t ? `; the real next token ${JSON.stringify(lens.tokens[pos + 1].piece)} `
      + `${(100 * lens.next_probs[r][pos]).toFixed(2)}%` : ""));
}
