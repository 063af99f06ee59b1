"""The limits a constraint must stay within, checked before llguidance sees it.

llguidance compiles a grammar recursively on the caller's stack: a JSON Schema whose `$ref`s chain 930 definitions
deep, or a Lark grammar whose rules chain 2,700 deep, overflows an 8 MiB thread stack and kills the whole process
(SIGSEGV); 70,000 choices take 25 s and then panic. These checks refuse such inputs, naming the limit, in time
linear in their size and without recursion (each walk keeps its own stack). The limits sit far below where the
compiler fails (measured: docs/structured-output.md), and the server still compiles in a separate process first
(engine.generation.constraint_compiler), since no input check can rule out every native failure.

Each check raises ValueError with a one-line reason; the caller names the field.
"""
from __future__ import annotations

import json
import re
from urllib.parse import unquote

from engine.generation.json_schemas import subschemas

MAX_CONSTRAINT_BYTES = 256 * 1024  # a schema's JSON text, a regex, a grammar, all choices together (UTF-8 bytes)
MAX_JSON_NESTING = 128  # containers inside containers in a schema document (llguidance's JSON reader stops at 128)
MAX_SCHEMA_DEPTH = 128  # subschemas inside subschemas, each $ref one level more (8 MiB of stack failed at 1,508)
MAX_GRAMMAR_DEPTH = 256  # rules referring to rules, in a chain (8 MiB of stack failed at 2,688)
MAX_CHOICES = 5_000  # options of a choice constraint (10,000 took 0.4 s to compile, 70,000 25 s then failed)


def check_size(text: str, what: str) -> None:
    """ValueError when `text` (a constraint's text) is over MAX_CONSTRAINT_BYTES."""
    size = len(text.encode("utf-8", "surrogatepass")) if len(text) * 4 > MAX_CONSTRAINT_BYTES else len(text)
    if size > MAX_CONSTRAINT_BYTES:
        raise ValueError(f"{what} is {size:,} bytes, over the limit of {MAX_CONSTRAINT_BYTES:,}")


def check_choices(choices) -> None:
    """ValueError when a choice list has more than MAX_CHOICES options or more than MAX_CONSTRAINT_BYTES in all."""
    if len(choices) > MAX_CHOICES:
        raise ValueError(f"{len(choices):,} options, over the limit of {MAX_CHOICES:,}")
    total = sum(len(c.encode("utf-8", "surrogatepass")) for c in choices)
    if total > MAX_CONSTRAINT_BYTES:
        raise ValueError(f"the options are {total:,} bytes in all, over the limit of {MAX_CONSTRAINT_BYTES:,}")


def json_nesting(value) -> int:
    """How deep containers (dicts, lists) nest in JSON data: 0 for a scalar, 1 for {} or []."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_NESTING + 1:  # past the limit the answer is "too deep" already
                stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def check_schema(schema) -> None:
    """ValueError when a JSON Schema (parsed) nests containers past MAX_JSON_NESTING or subschemas past
    MAX_SCHEMA_DEPTH, following local `$ref`s (each reference one level more; a reference back into the path being
    followed -- recursion -- ends the path)."""
    if json_nesting(schema) > MAX_JSON_NESTING:
        raise ValueError(f"nested more than {MAX_JSON_NESTING} levels deep (the limit)")
    depth = schema_depth(schema, stop_past=MAX_SCHEMA_DEPTH)
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"subschemas nest more than {MAX_SCHEMA_DEPTH} levels deep, each $ref counting as one more "
                         f"level (the limit is {MAX_SCHEMA_DEPTH})")


def schema_depth(schema, stop_past: int | None = None) -> int:
    """The longest chain of subschemas inside subschemas from the root, a local `$ref` leading to its target as one
    more level (a target already on the chain ends it: recursion); counting stops a little past `stop_past`."""
    memo: dict[int, int] = {}  # id(node) -> the depth of its subtree, once walked
    best: dict[int, int] = {}  # id(node) -> the deepest child subtree seen so far
    on_path: set[int] = set()
    longest = 0
    stack = [(schema, iter(_children(schema, schema)))]
    on_path.add(id(schema))
    best[id(schema)] = 0
    while stack:
        node, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            on_path.discard(id(node))
            memo[id(node)] = 1 + best[id(node)]
            longest = max(longest, len(stack) + memo[id(node)])
            if stack:
                parent = id(stack[-1][0])
                best[parent] = max(best[parent], memo[id(node)])
            continue
        key = id(child)
        if key in memo:
            best[id(node)] = max(best[id(node)], memo[key])
            longest = max(longest, len(stack) + memo[key])
        elif key not in on_path:
            on_path.add(key)
            best[key] = 0
            stack.append((child, iter(_children(child, schema))))
            longest = max(longest, len(stack))
        if stop_past is not None and longest > stop_past:
            return longest
    return longest


def _children(node, root) -> list:
    """A schema's subschemas (dicts) and, for a local `$ref`, its target."""
    if not isinstance(node, dict):
        return []
    out = [sub for _, sub in subschemas(node) if isinstance(sub, dict)]
    target = _resolve(node.get("$ref"), root)
    if isinstance(target, dict):
        out.append(target)
    return out


def _resolve(ref, root):
    """The local target of a `$ref` ('#', '#/$defs/a', percent-encoded and ~-escaped); None when not local or
    not found."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node = root
    for token in unquote(ref[1:]).split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node


# ---- Lark grammars (llguidance's syntax; GBNF arrives here converted) ----------------------------------------------
_DEFINITION = re.compile(r"^[?!]?([A-Za-z_][A-Za-z_0-9]*)(?:\.-?\d+)?\s*:(?!:)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"i?')
_REGEX = re.compile(r"/(?:[^/\\\n]|\\.)+/[imslux]*")
_COMMENT = re.compile(r"//[^\n]*")
_EMBEDDED_JSON = re.compile(r"%json\s*")


def check_grammar(lark: str) -> None:
    """ValueError when a Lark grammar's rules chain past MAX_GRAMMAR_DEPTH (rule a refers to b, b to c, ...) or a
    schema embedded with %json breaks check_schema's limits."""
    rules: dict[str, set[str]] = {}
    current: str | None = None
    for line, schemas in _lines(lark):
        for schema in schemas:
            check_schema(schema)
        match = _DEFINITION.match(line)
        if match:
            current = match.group(1)
            rules.setdefault(current, set()).update(_NAME.findall(line[match.end():]))
        elif line.startswith("%"):
            current = None
        elif current is not None and (line[:1].isspace() or line.lstrip().startswith("|")):
            rules[current].update(_NAME.findall(line))  # a continuation line of the rule above
    depth = _chain_depth(rules, stop_past=MAX_GRAMMAR_DEPTH)
    if depth > MAX_GRAMMAR_DEPTH:
        raise ValueError(f"rules refer to rules in a chain more than {MAX_GRAMMAR_DEPTH} deep (the limit)")


def _lines(lark: str):
    """The grammar's lines with strings, regexes, comments and %json objects taken out -> (line, [schemas embedded
    on it]); ValueError for a %json object that is not JSON."""
    out, schemas, pos = [], [], 0
    pieces = []
    decoder = json.JSONDecoder()
    while pos < len(lark):
        embedded = _EMBEDDED_JSON.search(lark, pos)
        end = embedded.start() if embedded else len(lark)
        pieces.append(_strip(lark[pos:end]))
        if not embedded:
            break
        try:
            schema, pos = decoder.raw_decode(lark, embedded.end())
        except RecursionError:
            raise ValueError(f"a %json schema nests more than {MAX_JSON_NESTING} levels deep (the limit)") from None
        except ValueError:
            pieces.append(" ")
            pos = embedded.end()
            continue  # llguidance reports the error
        schemas.append(schema)
        pieces.append(f" \0{len(schemas) - 1}\0 ")
    for line in "".join(pieces).split("\n"):
        found = [schemas[int(i)] for i in re.findall(r"\0(\d+)\0", line)]
        out.append((re.sub(r"\0\d+\0", " ", line), found))
    return out


def _strip(text: str) -> str:
    """Lark text without its string literals, regexes and comments (so their words are not taken for names)."""
    text = _STRING.sub(" ", text)
    text = _REGEX.sub(" ", text)
    return _COMMENT.sub("", text)


def _chain_depth(graph: dict[str, set[str]], stop_past: int) -> int:
    """The longest chain of names each referring to the next (a name already on the chain ends it)."""
    memo: dict[str, int] = {}
    longest = 0
    for root in graph:
        if root in memo:
            continue
        stack = [(root, iter(graph.get(root, ())))]
        on_path, best = {root}, {root: 0}
        while stack:
            name, refs = stack[-1]
            ref = next(refs, None)
            if ref is None:
                stack.pop()
                on_path.discard(name)
                memo[name] = 1 + best[name]
                if stack:
                    best[stack[-1][0]] = max(best[stack[-1][0]], memo[name])
                longest = max(longest, len(stack) + memo[name])
            elif ref in memo:
                best[name] = max(best[name], memo[ref])
                longest = max(longest, len(stack) + memo[ref])
            elif ref in graph and ref not in on_path:
                on_path.add(ref)
                best[ref] = 0
                stack.append((ref, iter(graph[ref])))
                longest = max(longest, len(stack))
            if longest > stop_past:
                return longest
    return longest
