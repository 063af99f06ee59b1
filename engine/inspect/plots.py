"""PNG pictures of attention and the logit lens, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Sizes in pixels (DPI 100), fixed so a reader knows what to expect:
- one head (`plot_head`): HEAD_SIZE, 1000 x 900;
- one layer's heads (`plot_layer`): PANEL_PX per head panel, plus LAYER_MARGIN_PX: max(LAYER_MIN_WIDTH_PX,
  cols * 240 + 80) x (rows * 240 + 130), cols = the KV group size (heads sharing a KV head side by side) when
  2..8, else ceil(sqrt(n_heads)) capped at 8;
- the whole model's head map (`plot_head_summary`): SUMMARY_SIZE, 1800 x 650;
- the logit lens (`plot_lens`): (LENS_LEFT_PX + LENS_RIGHT_PX + LENS_CELL_W * T) x
  (LENS_TOP_PX + LENS_BOTTOM_PX + LENS_CELL_H * (L + 1)), 150 + 30 + 84 T by 140 + 170 + 30 (L + 1),
  T the positions shown (at most LENS_MAX_POSITIONS, the last ones).
Attention colour scales are clipped at the largest probability outside key 0, so the first token's "sink"
column cannot wash out the rest; key-0 cells above the scale are drawn in SINK_COLOUR with their value.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from engine.inspect.attention import HeadSummary
from engine.inspect.lens import LogitLens
from engine.inspect.tokens import shown_piece

DPI = 100
HEAD_SIZE = (1000, 900)
PANEL_PX = 240
LAYER_MARGIN_PX = (80, 130)
LAYER_MIN_WIDTH_PX = 900
SUMMARY_SIZE = (1800, 650)
LENS_LEFT_PX, LENS_RIGHT_PX, LENS_TOP_PX, LENS_BOTTOM_PX, LENS_CELL_W, LENS_CELL_H = 150, 30, 140, 170, 84, 30
LENS_MAX_POSITIONS = 32
MASKED_COLOUR = "#d9d9d9"
SINK_COLOUR = "#e4572e"
MAX_TICK_LABELS = 48


def _figure(width_px: int, height_px: int) -> Figure:
    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")  # never bbox_inches="tight": the documented size is the size
    return path


def layer_grid(n_heads: int, n_kv_heads: int) -> tuple[int, int]:
    """(rows, cols) of a layer's head panels: a KV group per row when the group is 2..8 heads."""
    group = n_heads // n_kv_heads
    cols = group if 2 <= group <= 8 else min(8, math.ceil(math.sqrt(n_heads)))
    return math.ceil(n_heads / cols), cols


def layer_size(n_heads: int, n_kv_heads: int) -> tuple[int, int]:
    """(width, height) in pixels of `plot_layer`'s PNG."""
    rows, cols = layer_grid(n_heads, n_kv_heads)
    return max(LAYER_MIN_WIDTH_PX, cols * PANEL_PX + LAYER_MARGIN_PX[0]), rows * PANEL_PX + LAYER_MARGIN_PX[1]


def lens_size(n_positions: int, n_rows: int) -> tuple[int, int]:
    """(width, height) in pixels of `plot_lens`'s PNG for T positions and L + 1 rows."""
    shown = min(n_positions, LENS_MAX_POSITIONS)
    return (LENS_LEFT_PX + LENS_RIGHT_PX + LENS_CELL_W * shown,
            LENS_TOP_PX + LENS_BOTTOM_PX + LENS_CELL_H * n_rows)


def sink_clipped_scale(attention: np.ndarray) -> float:
    """The colour-scale top for attention (..., T, T): the largest probability outside key 0 (1.0 if none)."""
    rest = attention[..., 1:, 1:]
    top = float(rest.max()) if rest.size else 0.0
    return top if top > 0 else 1.0


def _attention_cmap():
    cmap = colormaps["viridis"].copy()
    cmap.set_bad(MASKED_COLOUR)
    cmap.set_over(SINK_COLOUR)
    return cmap


def _masked(probs: np.ndarray) -> np.ma.MaskedArray:
    t = probs.shape[-1]
    return np.ma.masked_array(probs, mask=np.triu(np.ones((t, t), dtype=bool), 1))


def _tick_positions(n: int, most: int = MAX_TICK_LABELS) -> np.ndarray:
    step = max(1, math.ceil(n / most))
    return np.arange(0, n, step)


def plot_head(probs: np.ndarray, pieces: list[str], path, layer: int, head: int, kv_head: int) -> Path:
    """One head's attention probs (T, T) as a query x key heatmap with token labels -> PNG at `path` (HEAD_SIZE)."""
    t = probs.shape[0]
    fig = _figure(*HEAD_SIZE)
    ax = fig.add_axes((0.15, 0.17, 0.68, 0.72))
    cax = fig.add_axes((0.86, 0.17, 0.025, 0.72))
    vmax = sink_clipped_scale(probs)
    image = ax.imshow(_masked(probs), cmap=_attention_cmap(), norm=Normalize(0.0, vmax), interpolation="nearest")
    ticks = _tick_positions(t)
    labels = [f"{shown_piece(pieces[i])} {i}" for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90, fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_xlabel("key (attended-to token)")
    ax.set_ylabel("query (attending token)")
    if t <= 40:
        for q in range(t):
            if probs[q, 0] > vmax:
                ax.text(0, q, f"{probs[q, 0]:.2f}", ha="center", va="center", fontsize=6.5, color="white")
    bar = fig.colorbar(image, cax=cax, extend="max" if float(probs[:, 0].max()) > vmax else "neither")
    bar.set_label("attention probability")
    fig.suptitle(f"layer {layer}, head {head} (KV head {kv_head}) — {t} tokens", fontsize=13)
    fig.text(0.5, 0.935, f"colour scale clipped at {vmax:.3f}, the largest weight outside key 0; "
             f"key-0 weights above it in red with their value; grey: masked (future keys)",
             ha="center", fontsize=9)
    return _save(fig, path)


def plot_layer(attentions: np.ndarray, n_kv_heads: int, pieces: list[str], path, layer: int) -> Path:
    """One layer's attention (n_heads, T, T) as a grid of small heatmaps grouped by KV head -> PNG (`layer_size`).

    Each panel has its own colour scale, clipped at its largest weight outside key 0 (red above it).
    """
    n_heads, t, _ = attentions.shape
    group = n_heads // n_kv_heads
    rows, cols = layer_grid(n_heads, n_kv_heads)
    width, height = layer_size(n_heads, n_kv_heads)
    fig = _figure(width, height)
    left, bottom = (width - cols * PANEL_PX) / 2 / width, 30 / height  # the grid centred under the title
    pw, ph = PANEL_PX / width, PANEL_PX / height
    cmap = _attention_cmap()
    frame = colormaps["tab10"]
    for h in range(n_heads):
        r, col = divmod(h, cols)
        ax = fig.add_axes((left + col * pw + 0.1 * pw, bottom + (rows - 1 - r) * ph + 0.06 * ph, 0.8 * pw, 0.8 * ph))
        ax.imshow(_masked(attentions[h]), cmap=cmap, norm=Normalize(0.0, sink_clipped_scale(attentions[h])),
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        kv = h // group
        for spine in ax.spines.values():
            spine.set_edgecolor(frame(kv % 10))
            spine.set_linewidth(2.5)
        ax.set_title(f"head {h} · KV {kv}", fontsize=9, color=frame(kv % 10), pad=3)
    fig.suptitle(f"layer {layer}: {n_heads} heads, {n_kv_heads} KV heads ({group} query heads each), {t} tokens",
                 fontsize=12, y=1 - 20 / height)
    fig.text(0.5, 1 - 42 / height, "in each panel rows are queries, columns keys; grey: masked (future keys)\n"
             "each panel has its own colour scale, clipped at its largest weight outside key 0 (red: above it)",
             ha="center", va="top", fontsize=9, linespacing=1.5)
    return _save(fig, path)


def plot_head_summary(summary: HeadSummary, n_kv_heads: int, path, n_tokens: int) -> Path:
    """The whole model as three layers x heads maps (attention to key 0, to the previous token, entropy) -> PNG
    (SUMMARY_SIZE)."""
    n_layers, n_heads = summary.to_first.shape
    group = n_heads // n_kv_heads
    fig = _figure(*SUMMARY_SIZE)
    panels = [(summary.to_first, "attention to the first token (BOS)", "magma", 0.0, 1.0),
              (summary.to_previous, "attention to the previous token", "magma", 0.0, 1.0),
              (summary.entropy, "row entropy (nats)", "cividis", 0.0, math.log(n_tokens))]
    annotate = n_layers * n_heads <= 96
    for k, (values, title, cmap, vmin, vmax) in enumerate(panels):
        ax = fig.add_axes((0.04 + k * 0.33, 0.14, 0.25, 0.7))
        cax = fig.add_axes((0.04 + k * 0.33 + 0.255, 0.14, 0.008, 0.7))
        image = ax.imshow(values, cmap=cmap, norm=Normalize(vmin, vmax), aspect="auto", interpolation="nearest",
                          origin="lower")
        fig.colorbar(image, cax=cax)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("head" + (f" (white lines between KV groups of {group})" if 1 < group < n_heads else ""))
        ax.set_ylabel("layer")
        ax.set_xticks(_tick_positions(n_heads, most=16))
        ax.set_yticks(_tick_positions(n_layers, most=24))
        for g in range(1, n_kv_heads if group > 1 else 0):
            ax.axvline(g * group - 0.5, color="white", linewidth=1.2)
        if annotate:
            norm = Normalize(vmin, vmax)
            for (li, hi), v in np.ndenumerate(values):
                ax.text(hi, li, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if norm(v) > 0.6 else "white")
    fig.suptitle(f"every head at a glance ({n_layers} layers x {n_heads} heads, {n_tokens} tokens; "
                 f"averages over queries 1..{n_tokens - 1})", fontsize=13)
    return _save(fig, path)


def plot_lens(lens: LogitLens, pieces_of, path) -> Path:
    """The logit lens as a rows x positions table: each cell the top token at that layer and position, coloured by
    its probability, bold where it is the real next token; inputs along the bottom, real next tokens along the top.
    pieces_of(ids) -> list of pieces. At most LENS_MAX_POSITIONS (the last) positions -> PNG (`lens_size`)."""
    n_rows, t = lens.top_ids.shape
    first = max(0, t - LENS_MAX_POSITIONS)
    cols = range(first, t)
    width, height = lens_size(t, n_rows)
    fig = _figure(width, height)
    ax = fig.add_axes((LENS_LEFT_PX / width, LENS_BOTTOM_PX / height, LENS_CELL_W * len(cols) / width,
                       LENS_CELL_H * n_rows / height))
    cmap = colormaps["Blues"]
    image = ax.imshow(lens.top_probs[:, first:], cmap=cmap, norm=Normalize(0.0, 1.0), aspect="auto",
                      interpolation="nearest", origin="lower")
    ids = lens.token_ids
    for r in range(n_rows):
        for j, c in enumerate(cols):
            top = int(lens.top_ids[r, c])
            hit = c + 1 < t and top == int(ids[c + 1])
            ax.text(j, r, shown_piece(pieces_of([top])[0])[:10], ha="center", va="center", fontsize=7.5,
                    color="white" if lens.top_probs[r, c] > 0.55 else "black", fontweight="bold" if hit else "normal")
            if hit:
                ax.add_patch(Rectangle((j - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="#f2a900", linewidth=1.5))
    inputs = pieces_of([int(i) for i in ids[first:]])
    targets = pieces_of([int(i) for i in ids[first + 1:]]) + ["?"]
    ax.set_xticks(range(len(inputs)), [shown_piece(p)[:12] for p in inputs], rotation=90, fontsize=8)
    ax.set_yticks(range(n_rows), ["embeddings"] + [f"after layer {i}" for i in range(n_rows - 1)], fontsize=8)
    ax.set_ylabel("layer (output at the top)")  # the web page draws it the same way up
    ax.set_xlabel("input token at each position")
    top_axis = ax.secondary_xaxis("top")
    top_axis.set_xticks(range(len(targets)), [shown_piece(p)[:12] for p in targets], rotation=90, fontsize=8)
    top_axis.set_xlabel("real next token")
    cax = fig.add_axes((LENS_LEFT_PX / width, 50 / height, min(0.4, 500 / width), 12 / height))
    bar = fig.colorbar(image, cax=cax, orientation="horizontal")
    bar.set_label("probability of the top token (bold, framed: it is the real next token)", fontsize=8)
    shown = "" if first == 0 else f", last {t - first} of {t} positions"
    fig.text(0.5, 1 - 18 / height, f"logit lens: top token of lm_head(final_norm(residual)) per layer and position"
             f"{shown}", ha="center", fontsize=11)
    return _save(fig, path)
