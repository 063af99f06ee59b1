"""`tinyllama inspect WHAT`: look inside the model — tokens, next, perplexity, attention, lens, neighbours. Each
prints a table (or one JSON object with --json); the work is engine.inspect's, this module parses and prints."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from engine.cli.common import add_model_options, load
from engine.errors import EngineError

COMMANDS = ("tokens", "next", "perplexity", "attention", "lens", "neighbours")


def add_inspect_parser(sub) -> None:
    """Add `inspect` and its subcommands to the `tinyllama` subparsers `sub`."""
    p = sub.add_parser("inspect", help="look inside the model: tokens, next-token probabilities, perplexity, "
                                       "attention maps, logit lens, embedding neighbours",
                       description="Look inside the model. Every number equals transformers' (float32, eager "
                                   "attention); `--json` prints one JSON object instead of a table.")
    what = p.add_subparsers(dest="inspect_command", required=True, metavar="WHAT")

    def command(name: str, help_text: str, text_help: str | None = "text (- reads stdin)") -> argparse.ArgumentParser:
        q = what.add_parser(name, help=help_text, description=help_text)
        add_model_options(q)
        q.add_argument("--json", action="store_true", help="print one JSON object")
        if text_help:
            q.add_argument("text", help=text_help)
        return q

    q = command("tokens", "how the text becomes tokens: index, id, piece, bytes, special tokens marked")
    q.add_argument("--chat", action="store_true", help="wrap the text in the chat template as a user message")
    q.add_argument("--system", help="system message (with --chat)")

    q = command("next", "the top-k next tokens with logit and probability, raw and under the sampling settings")
    q.add_argument("--k", type=int, default=10, help="how many candidates (default 10)")
    g = q.add_argument_group("sampling settings (defaults from generation_config.json; greedy otherwise)")
    g.add_argument("--temperature", type=float, help="0 means greedy")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, help="nucleus threshold in (0, 1]")
    g.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, help="> 1 discourages the prompt's tokens")

    q = command("perplexity", "per-token negative log-likelihood, mean and perplexity (sliding windows past the "
                              "context)", text_help="a file to read, - for stdin, or the text itself")
    q.add_argument("--window", type=int, help="tokens per forward pass (default: the model's context)")
    q.add_argument("--stride", type=int, help="tokens each window moves on (default window / 2)")
    q.add_argument("--worst", type=int, default=0, metavar="N", help="list the N least expected tokens")

    q = command("attention", "attention maps as PNGs: one head, one layer's heads, every head's summary")
    q.add_argument("--layer", type=int, required=True, help="layer to draw (0-based)")
    q.add_argument("--head", type=int, help="also draw this head of the layer on its own")
    q.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs")

    q = command("lens", "the logit lens: each layer's top next token at each position")
    q.add_argument("--out", metavar="FILE.png", help="also draw the table as a PNG")

    q = command("neighbours", "nearest tokens by cosine similarity in the embedding matrix",
                text_help="a word that is one token (e.g. Paris), or a vocabulary piece (▁Paris)")
    q.add_argument("--k", type=int, default=10, help="how many neighbours (default 10)")
    q.add_argument("--id", action="store_true", help="the argument is a token id")
    q.add_argument("--matrix", choices=("embed", "lm_head"), default="embed",
                   help="input embeddings (default) or the output layer's rows")


def run_inspect(args) -> int:
    """The `inspect` subcommands -> exit status 0 (user errors raise EngineError / CheckpointError)."""
    return globals()[f"run_{args.inspect_command}"](args)


def read_text(arg: str) -> str:
    """The TEXT argument; '-' reads stdin."""
    return sys.stdin.read() if arg == "-" else arg


def emit(args, obj: dict, lines: list[str]) -> int:
    """Print `obj` as JSON with --json, else the table `lines`."""
    print(json.dumps(obj, ensure_ascii=False) if args.json else "\n".join(lines))
    return 0


def positive(value: int, option: str) -> int:
    """`value` if it is >= 1, else EngineError naming `option`."""
    if value is None or value < 1:
        raise EngineError(f"{option} must be >= 1, got {value}")
    return value


def shown(piece: str) -> str:
    """A vocabulary piece as a one-line table cell."""
    from engine.inspect.tokens import shown_piece

    return shown_piece(piece)


# --- tokens --------------------------------------------------------------------------------------------------

def tokenizer_only(args):
    """The tokenizer of --model (a folder's tokenizer.json, or a GGUF file's vocabulary), no weights loaded."""
    from engine.text.gguf_tokenizer import GGUFTokenizerError
    from engine.text.tokenizer import Tokenizer
    from weights.errors import CheckpointError
    from weights.gguf_file import GGUFFile, is_gguf_path
    from weights.hub import resolve_gguf_file, resolve_model_folder

    gguf_file = getattr(args, "gguf_file", None)
    if gguf_file is not None or is_gguf_path(args.model):
        path = resolve_gguf_file(args.model, gguf_file, args.revision)
        with GGUFFile(path) as f:
            meta = f.tokenizer_metadata()
        try:
            return Tokenizer.from_gguf_metadata(meta)
        except GGUFTokenizerError as e:
            raise CheckpointError(f"{path}: {e}") from None
    folder = resolve_model_folder(args.model, args.revision)
    if not (folder / "tokenizer.json").exists():
        raise CheckpointError(f"{folder}: no tokenizer.json in the model folder")
    return Tokenizer.from_folder(folder)


def run_tokens(args) -> int:
    """`inspect tokens`: the token table of TEXT (tokenizer only, no weights)."""
    from engine.inspect.tokens import token_rows

    tokenizer = tokenizer_only(args)
    text = read_text(args.text)
    if args.chat:
        if tokenizer.chat_template is None:
            raise EngineError(f"{args.model} has no chat template; run without --chat")
        ids = tokenizer.encode_chat(([{"role": "system", "content": args.system}] if args.system else [])
                                    + [{"role": "user", "content": text}])
    elif args.system:
        raise EngineError("--system needs --chat")
    else:
        ids = tokenizer.encode(text)
    rows = token_rows(tokenizer, ids)
    lines = [f"{'index':>5}  {'id':>6}  {'piece':<16} {'bytes':<24} text"]
    for r in rows:
        hex_bytes = r.bytes.hex(" ")
        lines.append(f"{r.index:>5}  {r.token_id:>6}  {shown(r.piece):<16} {hex_bytes:<24} "
                     f"{'(special)' if r.special else '(part of a character)' if r.text is None else repr(r.text)}")
    lines.append(f"{len(rows)} tokens ({sum(r.special for r in rows)} special)")
    return emit(args, {"token_ids": ids, "tokens": [r.to_json() for r in rows]}, lines)


# --- next ----------------------------------------------------------------------------------------------------

def run_next(args) -> int:
    """`inspect next`: the top-k next tokens, raw and under the sampling settings."""
    from engine.generation.state import default_options
    from engine.inspect.next_token import next_tokens

    positive(args.k, "--k")
    model = load(args)
    sampling = default_options(model, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               min_p=args.min_p, repetition_penalty=args.repetition_penalty).sampling
    result = next_tokens(model, read_text(args.text), k=args.k, sampling=sampling)
    s = result.sampling
    settings = ("greedy (the top token is always picked)" if s.greedy else
                f"temperature {s.temperature}, top_k {s.top_k}, top_p {s.top_p}, min_p {s.min_p}")
    if s.repetition_penalty != 1.0:
        settings += f", repetition_penalty {s.repetition_penalty}"
    lines = [f"prompt: {len(result.prompt_ids)} tokens; sampling: {settings}; {result.kept} token"
             f"{'s' if result.kept != 1 else ''} can be picked",
             f"{'rank':>4}  {'id':>6}  {'piece':<16} {'logit':>9} {'prob':>8}  {'sampled':>8}"]
    for c in result.candidates:
        lines.append(f"{c.rank:>4}  {c.token_id:>6}  {shown(c.piece):<16} {c.logit:>9.4f} {c.probability:>8.4f}  "
                     f"{c.sampled_probability:>8.4f}")
    obj = {"prompt_token_ids": result.prompt_ids, "kept": result.kept,
           "sampling": {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
                        "repetition_penalty": s.repetition_penalty, "greedy": s.greedy},
           "candidates": [vars(c) for c in result.candidates]}
    return emit(args, obj, lines)


# --- perplexity ----------------------------------------------------------------------------------------------

def perplexity_source(arg: str) -> str:
    """stdin for '-', a file's text when `arg` names a file, else `arg` itself."""
    if arg == "-":
        return sys.stdin.read()
    path = Path(arg)
    try:
        is_file = path.is_file()
    except OSError:  # a long text is not a path
        is_file = False
    if is_file:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EngineError(f"{arg}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
    return arg


def run_perplexity(args) -> int:
    """`inspect perplexity`: mean NLL, perplexity, the --worst tokens."""
    from engine.inspect.perplexity import perplexity

    if args.worst < 0:
        raise EngineError(f"--worst must be >= 0, got {args.worst}")
    model = load(args)
    r = perplexity(model, perplexity_source(args.text), window=args.window, stride=args.stride)
    tokenizer = model.tokenizer
    scored = int(r.scored.sum())
    lines = [f"tokens: {r.token_ids.size} ({scored} scored) in {len(r.windows)} window"
             f"{'s' if len(r.windows) > 1 else ''} of up to {r.window} tokens, stride {r.stride}",
             f"mean NLL: {r.mean_nll:.4f} nats/token   perplexity: {r.perplexity:.4f}"]
    worst = []
    for j in r.worst(args.worst):
        nll = float(r.nll[j - 1])
        token = int(r.token_ids[j])
        worst.append({"position": j, "token_id": token, "piece": tokenizer.id_to_token(token),
                      "nll": nll, "probability": math.exp(-nll),
                      "expected_id": int(r.predicted_ids[j - 1]),
                      "expected_piece": tokenizer.id_to_token(int(r.predicted_ids[j - 1]))})
    if worst:
        lines.append(f"the {len(worst)} least expected tokens:")
        lines.append(f"{'position':>8}  {'id':>6}  {'piece':<16} {'NLL':>8} {'prob':>9}  model expected")
        for x in worst:
            lines.append(f"{x['position']:>8}  {x['token_id']:>6}  {shown(x['piece']):<16} {x['nll']:>8.3f} "
                         f"{x['probability']:>9.2e}  {shown(x['expected_piece'])}")
    obj = {"tokens": int(r.token_ids.size), "scored_tokens": scored, "mean_nll": r.mean_nll,
           "perplexity": r.perplexity, "window": r.window, "stride": r.stride,
           "windows": [{"begin": x.begin, "end": x.end, "scored_from": x.scored_from} for x in r.windows],
           "nll": [None if v != v else float(v) for v in r.nll], "worst": worst}
    return emit(args, obj, lines)


# --- attention -----------------------------------------------------------------------------------------------

def check_index(value: int | None, count: int, option: str, what: str) -> None:
    """EngineError when `value` (an --option) is not in 0..count-1."""
    if value is not None and not 0 <= value < count:
        raise EngineError(f"{option} {value} is out of range: this model has {what} 0..{count - 1}")


def run_attention(args) -> int:
    """`inspect attention`: the layer, head and whole-model PNGs, the layer's head summaries."""
    from engine.inspect.attention import head_summary, summarise_heads
    from engine.inspect.plots import plot_head, plot_head_summary, plot_layer

    model = load(args)
    c = model.config
    check_index(args.layer, c.num_hidden_layers, "--layer", "layers")
    check_index(args.head, c.num_attention_heads, "--head", "heads")
    ids = model.prompt_ids(read_text(args.text))
    if len(ids) < 2:
        raise EngineError("attention maps need at least 2 tokens")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EngineError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    trace = model.trace(ids, attentions=True, layers=[args.layer])
    probs = trace.attentions[args.layer]
    pieces = [model.tokenizer.id_to_token(i) for i in ids]
    files = [plot_layer(probs, c.num_key_value_heads, pieces, out / f"layer{args.layer}.png", args.layer)]
    if args.head is not None:
        files.append(plot_head(probs[args.head], pieces, out / f"layer{args.layer}-head{args.head}.png", args.layer,
                               args.head, args.head // c.group_size))
    summary = head_summary(model, ids)
    files.append(plot_head_summary(summary, c.num_key_value_heads, out / "heads.png", len(ids)))
    first, previous, entropy = summarise_heads(probs)
    lines = [f"layer {args.layer}, {len(ids)} tokens: per head, attention to the first token / to the previous "
             f"token / row entropy (nats)"]
    lines += [f"  head {h:>2} (KV {h // c.group_size}): {first[h]:.3f} / {previous[h]:.3f} / {entropy[h]:.3f}"
              for h in range(c.num_attention_heads)]
    lines += [f"wrote {f}" for f in files]
    obj = {"token_ids": ids, "layer": args.layer, "files": [str(f) for f in files],
           "summary": {"to_first": summary.to_first.tolist(), "to_previous": summary.to_previous.tolist(),
                       "entropy": summary.entropy.tolist()}}
    if args.head is not None:
        obj["head"] = args.head
        obj["attention"] = probs[args.head].tolist()
    return emit(args, obj, lines)


# --- lens ----------------------------------------------------------------------------------------------------

def run_lens(args) -> int:
    """`inspect lens`: the logit-lens table (and PNG with --out)."""
    from engine.inspect.lens import logit_lens
    from engine.inspect.plots import plot_lens

    if args.out and Path(args.out).suffix.lower() != ".png":
        raise EngineError(f"--out {args.out}: give a .png file name")
    model = load(args)
    lens = logit_lens(model, read_text(args.text))
    piece = model.tokenizer.id_to_token
    ids = [int(i) for i in lens.token_ids]
    files = [plot_lens(lens, lambda xs: [piece(i) for i in xs], Path(args.out))] if args.out else []
    labels = ["emb"] + [str(i) for i in range(lens.top_ids.shape[0] - 1)]
    lines = ["top token at each position after each layer ('emb': the embeddings; the last column is the output)",
             f"{'pos':>4}  {'input':<12} {'next':<12} | " + " ".join(f"{x:<10}" for x in labels)]
    for t, token in enumerate(ids):
        nxt = shown(piece(ids[t + 1])) if t + 1 < len(ids) else "?"
        tops = " ".join(f"{shown(piece(int(lens.top_ids[r, t])))[:10]:<10}" for r in range(len(labels)))
        lines.append(f"{t:>4}  {shown(piece(token))[:12]:<12} {nxt[:12]:<12} | {tops}")
    lines += [f"wrote {f}" for f in files]
    obj = {"token_ids": ids, "rows": lens.row_labels,
           "top_ids": lens.top_ids.tolist(), "top_pieces": [[piece(int(i)) for i in row] for row in lens.top_ids],
           "top_probs": lens.top_probs.tolist(), "next_token_probs": lens.next_probs.tolist(),
           "files": [str(f) for f in files]}
    return emit(args, obj, lines)


# --- neighbours ----------------------------------------------------------------------------------------------

def run_neighbours(args) -> int:
    """`inspect neighbours`: the k nearest tokens by cosine similarity."""
    from engine.inspect.neighbours import nearest_tokens, token_for_word

    positive(args.k, "--k")
    model = load(args)
    if args.id:
        try:
            token_id = int(args.text)
        except ValueError:
            raise EngineError(f"--id: {args.text!r} is not a token id") from None
    else:
        token_id = token_for_word(model, args.text)
    neighbours = nearest_tokens(model, token_id, k=args.k, matrix=args.matrix)
    piece = model.tokenizer.id_to_token(token_id)
    lines = [f"nearest to {shown(piece)} (id {token_id}) by cosine similarity of the {args.matrix} rows",
             f"{'rank':>4}  {'id':>6}  {'piece':<16} {'cosine':>7}"]
    lines += [f"{n.rank:>4}  {n.token_id:>6}  {shown(n.piece):<16} {n.cosine:>7.4f}" for n in neighbours]
    obj = {"token_id": token_id, "piece": piece, "matrix": args.matrix, "neighbours": [vars(n) for n in neighbours]}
    return emit(args, obj, lines)
