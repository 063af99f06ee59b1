"""Turning benchmark rows into the roofline columns, the stdout table and the PNG plots."""
from __future__ import annotations

from pathlib import Path

from bench.roofline import decode_floor

GB = 1e9
NOISE_FLOOR = 0.05  # a speed-up within 5% of 1.00x is never told apart from none, whatever the spread


def count_text(n: float) -> str:
    """A parameter count in the unit that fits: '260K', '44.2M', '1.10B'."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.0f}K" if n >= 1e3 else f"{n:.0f}"


def bytes_unit(*values: float) -> tuple[str, float]:
    """The unit that fits the largest of `values` (bytes): ('GB', 1e9), ('MB', 1e6) or ('KB', 1e3)."""
    top = max([v for v in values if v] or [0])
    return ("GB", GB) if top >= GB else ("MB", 1e6) if top >= 1e6 else ("KB", 1e3)


def bytes_text(n: float) -> str:
    """A size in the unit that fits: '1.0 MB', '4.40 GB'."""
    unit, scale = bytes_unit(n)
    return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"


def relative_spread(row: dict, key: str) -> float | None:
    """(max - min) / median of a figure over its runs, None from a single run."""
    med, lo, hi = row.get(key), row.get(f"{key}_min"), row.get(f"{key}_max")
    if not med or lo is None or hi is None or hi == lo:
        return None
    return (hi - lo) / med


def speedup_noise(row: dict) -> str | None:
    """Why a speculative row's speed-up is noise, not a measurement, or None: above what its accepted drafts could
    give (each verification step yields at most 1 + accepted tokens), within the runs' own spread of 1.00x (or
    NOISE_FLOOR), or from one run of each, whose noise is unknown."""
    speedup = row["speedup"]
    most = 1 + row.get("acceptance_rate", 0) * row.get("draft_tokens", 0)
    if speedup > most * (1 + NOISE_FLOOR):
        return f"noise: {100 * row.get('acceptance_rate', 0):.0f}% accepted allows at most {most:.2f}x"
    spreads = [s for s in (relative_spread(row, "decode_tok_s"), relative_spread(row, "plain_decode_tok_s"))
               if s is not None]
    if not spreads:
        return "one run: noise not measured"
    band = max(NOISE_FLOOR, *spreads)
    if abs(speedup - 1) <= band:
        return f"within the runs' noise (±{100 * band:.0f}%)"
    return None


def add_roofline(rows: list[dict], machine: dict, model: dict) -> None:
    """Floors in `machine['roofline']` for the model, and on every measured row its own batch-1 decode floor (the
    bytes it reads per decoded token / read bandwidth; see bench.roofline) with the percentage of it reached at
    batch 1, against the read bandwidth measured just before that row's decode (`read_gbs_now`) where there is one."""
    roof = machine.get("roofline")
    if not roof:
        return
    bw = roof["read_gbs"]
    roof["fp32_weight_bytes"] = model["fp32_weight_bytes"]
    roof["fp32_decode_bytes"] = model["fp32_decode_bytes"]
    roof["decode_floor_fp32_tok_s"] = decode_floor(model["fp32_decode_bytes"], bw)
    roof["decode_floor_bf16_tok_s"] = decode_floor(model["fp32_decode_bytes"] // 2, bw)
    roof["prefill_ceiling_fp32_tok_s"] = roof["matmul_gflops"] * GB / (2 * model["weight_count"])
    for row in rows:
        if row.get("decode_bytes"):
            row["floor_tok_s"] = decode_floor(row["decode_bytes"], bw)
            if row.get("kind") == "decode" and row.get("batch") == 1 and row.get("decode_tok_s"):
                # the floor at the moment the row was measured, where the worker read the bandwidth then
                row["floor_now_tok_s"] = decode_floor(row["decode_bytes"], row.get("read_gbs_now") or bw)
                row["pct_of_floor"] = 100 * row["decode_tok_s"] / row["floor_now_tok_s"]


BUSY_CORES = 0.25  # other processes' average busy cores above which the figures are flagged


def busy_warning(machine: dict) -> str | None:
    """A warning line when other processes kept the CPUs busy before or during the run (from /proc/stat, which,
    unlike the load average, does not count threads waiting on IO), else None."""
    busy = machine.get("cpu_busy") or {}
    before, during = busy.get("others_before") or 0.0, busy.get("others_during") or 0.0
    if max(before, during) <= BUSY_CORES:
        return None
    return (f"warning: other processes kept {before:.2f} cores busy just before the run and {during:.2f} on average "
            f"during it (of {machine.get('cores')}); they share the cores these figures need, so they are low and "
            f"noisy")


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}" if v < 1000 else f"{v:,.0f}"


def _spread(row: dict, key: str) -> str:
    med, lo, hi = row.get(key), row.get(f"{key}_min"), row.get(f"{key}_max")
    if med is None:
        return "-"
    if lo is None or hi is None or row.get("repeats", 1) <= 1:
        return _fmt(med)
    return f"{_fmt(med)} [{_fmt(lo)}-{_fmt(hi)}]"


def _grid(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body])


def table(results: dict) -> str:
    rows, machine, model, settings = results["rows"], results.get("machine", {}), results["model"], results["settings"]
    out = [f"model: {model['folder']}  ({count_text(model['weight_count'])} parameters, "
           f"{bytes_text(model['fp32_weight_bytes'])} in fp32)"]
    if machine:
        blas = machine.get("blas") or {}
        out.append(f"machine: {machine.get('cpu')}, {machine.get('cores')} cores, {settings['threads']} threads; "
                   f"BLAS {blas.get('library')} {blas.get('version')} kernel {blas.get('kernel')} "
                   f"(OPENBLAS_CORETYPE={machine.get('OPENBLAS_CORETYPE')})"
                   + (f"; GPU {machine['gpu']['name']}" if machine.get("gpu") else ""))
        roof = machine.get("roofline")
        if roof:
            out.append(f"roofline: memory read {roof['read_gbs']:.1f} GB/s (NumPy, best of 1 and {settings['threads']}"
                       f" threads; GEMV {roof['gemv_gbs']:.1f} GB/s), fp32 matmul {roof['matmul_gflops']:.0f} GFLOP/s "
                       f"at M=128 -> batch-1 decode floor {roof['decode_floor_fp32_tok_s']:.2f} tok/s for the "
                       f"{bytes_text(roof['fp32_decode_bytes'])} of fp32 weights read per token "
                       f"({roof['decode_floor_bf16_tok_s']:.2f} for 16-bit)")
    warning = busy_warning(machine)
    if warning:
        out.append(warning)
    out.append(f"{settings['repeats']} timed run(s) after a warm-up; median [min-max]; decode after a "
               f"{settings['prompt_lens'][0]}-token prompt, {settings['new_tokens']} new tokens, aggregate tok/s")
    ok = [r for r in rows if r.get("status") == "ok"]
    labels = list(dict.fromkeys(r["label"] for r in rows))

    unit, scale = bytes_unit(*(r.get(k, 0) for r in ok for k in ("weight_bytes", "decode_bytes", "peak_rss_bytes")))
    digits = 2 if unit == "GB" else 1
    body, notes = [], []
    for label in labels:
        mine = [r for r in ok if r["label"] == label]
        bad = [r for r in rows if r["label"] == label and r.get("status") != "ok"]
        notes += [f"{label}: {r['status']}: {r.get('note', '')}" for r in bad]
        if not mine:
            body.append([label, bad[0].get("dtype", ""), bad[0]["status"], "-", "-", "-", "-", "-"])
            continue
        r0 = mine[0]
        body.append([label, r0["dtype"], r0.get("blas_kernel") or "-", _fmt(r0.get("load_s"), 2),
                     _fmt(r0.get("weight_bytes", 0) / scale, digits), _fmt(r0.get("decode_bytes", 0) / scale, digits),
                     _fmt(r0.get("peak_rss_bytes", 0) / scale, digits), _fmt(r0.get("floor_tok_s"), 2)])
    out += ["", "Systems", _grid(["system", "dtype", "kernel", "load s", f"weights {unit}", f"read/token {unit}",
                                  f"peak RSS {unit}", "B=1 floor tok/s"], body)]
    if notes:
        out += ["", "Notes"] + [f"- {n}" for n in notes]

    body = [[r["label"], r["prompt_tokens"], _spread(r, "prefill_tok_s"),
             _fmt(r.get("ttft_s"), 3)] for r in ok if r.get("kind") == "prefill"]
    if body:
        out += ["", "Prefill (batch 1)", _grid(["system", "prompt tokens", "prefill tok/s", "TTFT s"], body)]
    body = [[r["label"], r["batch"], _spread(r, "decode_tok_s"),
             f"{r['pct_of_floor']:.0f}%" if r.get("pct_of_floor") is not None else "",
             _fmt(r.get("read_gbs_now"))]
            for r in ok if r.get("kind") == "decode"]
    if body:
        out += ["", "Decode", _grid(["system", "batch", "decode tok/s", "% of B=1 floor", "read GB/s then"], body)]
    body = []
    for r in (r for r in ok if r.get("kind") == "long_context"):
        short = next((d for d in ok if d["label"] == r["label"] and d.get("kind") == "decode" and d["batch"] == 1), None)
        body.append([r["label"], r["context_tokens"], _spread(r, "decode_tok_s"),
                     f"{100 * r['decode_tok_s'] / short['decode_tok_s']:.0f}%" if short else "-",
                     _fmt(r["prefill_added_bytes"] / 1e6, 0)])
    if body:
        out += ["", f"Long context (batch 1; against batch-1 decode after {settings['prompt_lens'][0]} tokens; memory "
                    "a prefill of that context added over the loaded model: KV cache, activations)",
                _grid(["system", "context", "decode tok/s", "of short", "prefill adds MB"], body)]
    body = [[r["label"], f"{r.get('draft', 'lookup')} x{r['draft_tokens']}", _fmt(r["plain_decode_tok_s"], 2),
             _spread(r, "decode_tok_s"),
             f"{r['speedup']:.2f}x" + (f" ({noise})" if (noise := speedup_noise(r)) else ""),
             f"{100 * r['acceptance_rate']:.0f}%",
             f"{r['verify_step_s'] / r['step_s']:.2f}x" if r.get("step_s") else "",
             f"{r['draft_step_s'] / r['step_s']:.2f}x" if r.get("step_s") and r.get("draft_step_s") else "-",
             f"{r['draft_steps']} / {r['plain_steps']}" if "draft_steps" in r else "-"]
            for r in ok if r.get("kind") == "speculative"]
    if body:
        out += ["", "Speculative decoding (batch 1, greedy, the same tokens as plain decoding; a lookup draft's prompt "
                "repeats a passage; verify cost: a step of 1 + draft tokens against a step of 1; draft step: one "
                "batch-1 step of the draft model against a step of 1; steps: decode steps that drafted / that ran "
                "plain because drafting did not pay)",
                _grid(["system", "draft", "plain tok/s", "speculative tok/s", "speed-up", "accepted", "verify cost",
                       "draft step", "steps drafted / plain"], body)]
    return "\n".join(out)


def plot(results: dict, out_dir: Path) -> list[Path]:
    """decode_vs_batch.png and prefill_vs_prompt.png in out_dir (one line per system)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("status") == "ok"]
    roof = (results.get("machine") or {}).get("roofline")
    model = results["model"]
    paths = []
    for kind, x_key, y_key, xlabel, ylabel, name in (
            ("decode", "batch", "decode_tok_s", "batch size", "decode tokens/s (aggregate)", "decode_vs_batch.png"),
            ("prefill", "prompt_tokens", "prefill_tok_s", "prompt length (tokens)", "prefill tokens/s",
             "prefill_vs_prompt.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        xs_all = sorted({r[x_key] for r in rows if r.get("kind") == kind})
        for label in dict.fromkeys(r["label"] for r in rows):
            mine = sorted((r for r in rows if r["label"] == label and r.get("kind") == kind), key=lambda r: r[x_key])
            if not mine:
                continue
            xs = [r[x_key] for r in mine]
            ys = [r[y_key] for r in mine]
            lo = [r[y_key] - (r.get(f"{y_key}_min") or r[y_key]) for r in mine]
            hi = [(r.get(f"{y_key}_max") or r[y_key]) - r[y_key] for r in mine]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
        if roof and xs_all:
            if kind == "decode":
                floor = roof["decode_floor_fp32_tok_s"]
                ceiling = roof["prefill_ceiling_fp32_tok_s"]
                ax.plot(xs_all, [min(b * floor, ceiling) for b in xs_all], "k--", linewidth=1,
                        label="fp32 roofline (bandwidth, matmul)")
            else:
                ax.axhline(roof["prefill_ceiling_fp32_tok_s"], color="k", linestyle="--", linewidth=1,
                           label="fp32 matmul ceiling")
        if len(xs_all) > 1:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all, [str(x) for x in xs_all])
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} - {count_text(model['weight_count'])} params, "
                     f"{(results.get('machine') or {}).get('threads', '')} threads")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
