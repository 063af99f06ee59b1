"""The benchmark's parent process: pick the checkpoint, measure the roofline, run every system in its own worker
process, collect their JSON rows, and write results.json, the plots and the table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.errors import EngineError

REPO = Path(__file__).resolve().parent.parent
WARMUP_ROOM = 16  # decode steps beyond --new-tokens the worker may take (warm-up)


def default_out() -> Path:
    return REPO / "bench" / "out" / time.strftime("%Y%m%d-%H%M%S")


def worker_env(threads: int) -> dict:
    from bench.systems import threads_env

    env = threads_env(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


class WorkerFailed(Exception):
    pass


def run_worker(argv: list[str], env: dict, log: Path, on_event) -> int:
    """Run `python -m bench.worker ARGV`, its stderr into `log`; on_event(dict) for each message line."""
    from bench.worker import MARK

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bench.worker", *argv], stdout=subprocess.PIPE, stderr=err,
                                env=env, cwd=str(REPO), text=True, bufsize=1)
        try:
            for line in proc.stdout:
                if line.startswith(MARK):
                    on_event(json.loads(line[len(MARK):]))
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def resolve_checkpoint(model: str | None, revision: str | None, quick: bool, env: dict, logs: Path,
                       dtype: str = "bfloat16") -> Path:
    """The checkpoint folder: --model, else the cached random checkpoint of TinyLlama's (or the quick) shape, saved in
    `dtype` (bf16 by default, as TinyLlama ships: every system loads that same file)."""
    if model is not None:
        from weights.gguf_file import is_gguf_path
        from weights.hub import resolve_gguf_file, resolve_model_folder

        return resolve_gguf_file(model) if is_gguf_path(model) else resolve_model_folder(model, revision)
    from bench.checkpoints import QUICK_SHAPE, TINYLLAMA_SHAPE, checkpoint_folder, checkpoint_ready

    shape = QUICK_SHAPE if quick else TINYLLAMA_SHAPE
    if checkpoint_ready(shape, dtype):
        return checkpoint_folder(shape, dtype)
    print(f"making a random {dtype} checkpoint of {'the quick' if quick else 'TinyLlama-1.1B'} shape in "
          f"{checkpoint_folder(shape, dtype)} (once) ...", file=sys.stderr)
    found = {}
    log = logs / "checkpoint.log"
    rc = run_worker(["checkpoint", "quick" if quick else "tinyllama", dtype], env, log, found.update)
    if rc != 0 or "folder" not in found:
        raise EngineError(f"could not make the random checkpoint ({last_line(log) or f'exit {rc}'})")
    return Path(found["folder"])


def model_summary(folder: Path, settings: dict) -> dict:
    """Shape numbers from config.json (validated as the engine would), and a check that the runs fit its window."""
    from bench.roofline import decode_bytes
    from bench.systems import model_config
    from engine.config import ModelConfig

    config = ModelConfig.from_dict(model_config(str(folder)), source=str(folder))
    # a prompt run holds its prompt and the timed and warm-up decode steps; the long-context run holds exactly
    # --long-context tokens in all (its prompt is shortened by the decode steps)
    long_context, new_tokens = settings.get("long_context", 0), settings["new_tokens"]
    need = max(max(settings["prompt_lens"]) + new_tokens + WARMUP_ROOM, long_context)
    if need > config.max_position_embeddings:
        raise EngineError(f"--prompt-len {max(settings['prompt_lens'])} + --new-tokens {new_tokens} (+{WARMUP_ROOM} "
                          f"warm-up), or --long-context {long_context}, exceed the model's context window of "
                          f"{config.max_position_embeddings}")
    if long_context and long_context < new_tokens + WARMUP_ROOM + 1:
        raise EngineError(f"--long-context {long_context} leaves no prompt: it must exceed --new-tokens {new_tokens} "
                          f"+ {WARMUP_ROOM} warm-up steps (or be 0 to skip the run)")
    count = config.weight_count()
    embed = config.vocab_size * config.hidden_size
    return {"folder": str(folder), "weight_count": count, "fp32_weight_bytes": 4 * count,
            "fp32_decode_bytes": decode_bytes(4 * count, 4 * embed, config.tie_word_embeddings),
            "tie_word_embeddings": config.tie_word_embeddings,
            "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size, "max_position_embeddings": config.max_position_embeddings}


def run(settings: dict, model: str | None, revision: str | None, out: str | None) -> int:
    from tqdm import tqdm

    from bench import report

    if model is not None:  # a bad --model is one line before anything is written
        from weights.gguf_file import is_gguf_path
        from weights.hub import resolve_gguf_file, resolve_model_folder

        model = str(resolve_gguf_file(model) if is_gguf_path(model) else resolve_model_folder(model, revision))
    out_dir = Path(out) if out else default_out()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EngineError(f"--out {out_dir}: {e.strerror or e}") from None
    logs = out_dir / "logs"
    env = worker_env(settings["threads"])
    folder = resolve_checkpoint(model, revision, settings["quick"], env, logs, settings.get("checkpoint_dtype",
                                                                                             "bfloat16"))
    summary = model_summary(folder, settings)

    from bench.cpu_load import OthersBusy, others_busy_now

    machine: dict = {}
    load_start = os.getloadavg()
    busy = {"others_before": others_busy_now()}
    during = OthersBusy()
    rows: list[dict] = []  # as the workers sent them; roofline columns are added to copies when written
    failures: list[str] = []
    bar = tqdm(total=settings.get("rounds", 1), unit="step", desc="roofline", file=sys.stderr, disable=None,
               dynamic_ncols=True)

    def on_event(event: dict, system: str | None = None):
        kind = event["event"]
        if kind == "total":
            bar.total += event["units"]
            bar.refresh()
        elif kind == "status":
            bar.set_description(event.get("what", ""))
        elif kind == "progress":
            bar.set_description(event.get("what", system or ""), refresh=False)
            bar.update(1)
        elif kind == "roofline":
            machine.update(event["machine"])
        elif kind == "rows":
            rows.extend(event["rows"])
        elif kind == "unavailable":
            rows.append(event["row"])
            bar.write(f"{system}: {event['row']['note']}", file=sys.stderr)
        elif kind == "error":
            rows.extend(event["rows"])
            rows.append(event["row"])

    rounds = settings.get("rounds", 1)
    per_round: list[list[dict]] = []
    rooflines: list[dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="tinyllama-bench-") as tmp:
            for round_ in range(rounds):  # round-robin: every system once per round (bandwidth drifts)
                suffix = f"-round{round_ + 1}" if rounds > 1 else ""
                machine.clear()
                log = logs / f"roofline{suffix}.log"
                rc = run_worker(["roofline", str(settings["threads"])] + (["--quick"] if settings["quick"] else []),
                                env, log, on_event)
                bar.update(1)
                if rc != 0 or not machine:
                    failures.append(f"roofline: {last_line(log) or f'exit {rc}'}")
                rooflines.append(dict(machine))
                rows.clear()
                for system in settings["systems"]:
                    spec = dict(settings, system=system, folder=str(folder))
                    spec_path = Path(tmp) / f"{system}.json"
                    spec_path.write_text(json.dumps(spec))
                    log = logs / f"{system}{suffix}.log"
                    before = len(rows)
                    rc = run_worker(["run", str(spec_path)], env, log, lambda e, s=system: on_event(e, s))
                    if rc != 0:
                        note = next((r.get("note") for r in rows[before:] if r.get("status") == "error"), None)
                        note = note or last_line(log) or f"exit status {rc}"
                        if not any(r.get("status") == "error" for r in rows[before:]):
                            from bench.systems import describe

                            rows.append(dict(describe(system), label=system, status="error", note=note))
                        failures.append(f"{system}{suffix}: {note} (log: {log})")
                    busy["others_during"] = during.cores()
                    write_results(out_dir, summary, settings, merge_machines(rooflines), merge_rounds(
                        per_round + [rows]), load_start, busy, complete=False)
                per_round.append(list(rows))
    finally:
        bar.close()

    busy["others_during"] = during.cores()
    results = write_results(out_dir, summary, settings, merge_machines(rooflines), merge_rounds(per_round),
                            load_start, busy, complete=True)
    plots = report.plot(results, out_dir)
    print(report.table(results))
    print(f"\nresults: {out_dir / 'results.json'}" + "".join(f"\nplot: {p}" for p in plots))
    for f in failures:
        print(f"tinyllama: bench: {f}", file=sys.stderr)
    return 1 if failures else 0


MEDIAN_FIELDS = ("prefill_tok_s", "ttft_s", "decode_tok_s", "load_s", "read_gbs_now", "plain_decode_tok_s",
                 "acceptance_rate", "step_s", "verify_step_s")
MAX_FIELDS = ("peak_rss_bytes", "prefill_added_bytes")


def row_key(row: dict) -> tuple:
    """What a row measures: the same figure in every round."""
    return (row.get("label"), row.get("kind"), row.get("batch"), row.get("prompt_tokens"), row.get("status"))


def merge_rounds(per_round: list[list[dict]]) -> list[dict]:
    """One row per figure from the rows of every round: the median over the rounds of each round's figure (the
    median of its repeats), the min and max over every run of every round, the largest peak RSS; the per-round
    figures kept in `rounds`. A single round is returned as it is."""
    import statistics

    if len(per_round) <= 1:
        return [dict(r) for r in (per_round[0] if per_round else [])]
    merged: dict[tuple, list[dict]] = {}
    for rows in per_round:
        for row in rows:
            merged.setdefault(row_key(row), []).append(row)
    out = []
    for same in merged.values():
        row = dict(same[0])
        for field in MEDIAN_FIELDS:
            values = [r[field] for r in same if r.get(field) is not None]
            if values:
                row[field] = statistics.median(values)
                if field in ("prefill_tok_s", "ttft_s", "decode_tok_s"):
                    row["rounds"] = {**row.get("rounds", {}), field: values}
            for bound, pick in (("_min", min), ("_max", max)):
                bounds = [r[field + bound] for r in same if r.get(field + bound) is not None]
                if bounds:
                    row[field + bound] = pick(bounds)
        for field in MAX_FIELDS:
            values = [r[field] for r in same if r.get(field) is not None]
            if values:
                row[field] = max(values)
        if row.get("speedup") is not None:  # the ratio of the merged figures, as one round's is of its own
            row["speedup"] = row["decode_tok_s"] / row["plain_decode_tok_s"]
        out.append(row)
    return out


def merge_machines(rooflines: list[dict]) -> dict:
    """The machine facts of the first round with each roofline figure the median over the rounds (each round's
    kept in `roofline_rounds`)."""
    import statistics

    found = [m for m in rooflines if m.get("roofline")]
    if not found:
        return dict(rooflines[0]) if rooflines else {}
    machine = dict(found[0])
    if len(found) > 1:
        roofs = [m["roofline"] for m in found]
        machine["roofline"] = {k: (statistics.median(r[k] for r in roofs) if isinstance(v, (int, float)) else v)
                               for k, v in roofs[0].items()}
        machine["roofline_rounds"] = roofs
    return machine


def write_results(out_dir: Path, summary: dict, settings: dict, machine: dict, rows: list[dict], load_start,
                  busy: dict, complete: bool) -> dict:
    """results.json as it stands (written after every system too, with complete: false, so an interrupted run keeps
    what it measured). busy: cores other processes kept busy (bench.cpu_load) before and during the run."""
    from bench import report

    machine = dict(machine, load_average={"start": list(load_start), "end": list(os.getloadavg())},
                   cpu_busy=dict(busy))
    if machine.get("roofline"):
        machine["roofline"] = dict(machine["roofline"])
    rows = [dict(r) for r in rows]
    report.add_roofline(rows, machine, summary)
    results = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv[1:], "complete": complete,
               "model": summary, "settings": settings, "machine": machine, "rows": rows}
    path = out_dir / "results.json"
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    return results
