"""JSON Schema documents as the constraint compiler takes them: where the subschemas of a schema are, and objects
closed by default.

An object schema that lists `properties` (or `patternProperties`) and says nothing of `additionalProperties` is
closed: no other keys, as vLLM and OpenAI's strict mode read it (the JSON Schema standard leaves it open, and a
sampled model then opens new keys until its length limit). `additionalProperties: true` or a schema opens it again.
Objects combined with `allOf` stay as written: closing each part would leave only `{}`.

Integers are generated within +-2**53 (MAX_EXACT_INTEGER: what a float64, JavaScript's only number, holds exactly;
llguidance reads bounds as float64, so a bound past it would be rounded and the output could break it). An integer
without bounds gets these (at most 16 digits, as llama.cpp's 16-digit integers: a sampled model otherwise writes
digits until its length limit); a bound past them is narrowed to them (the output stays valid); a range that lies
wholly past them cannot be generated exactly and is refused (ValueError).

Every walk here is iterative (a stack, no recursion), so a schema nested thousands of levels deep costs no Python
recursion and no RecursionError.
"""
from __future__ import annotations

from typing import Iterator

SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> subschema
SCHEMA_ONE = ("additionalProperties", "items", "additionalItems", "contains", "not", "if", "then", "else",
              "propertyNames", "unevaluatedItems", "unevaluatedProperties")  # keyword -> one subschema
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")  # keyword -> a list of subschemas
LOCAL_REF_PREFIX = "#"
MAX_EXACT_INTEGER = 2 ** 53


def subschemas(schema: dict) -> Iterator[tuple[str, object]]:
    """The direct subschemas of one schema object -> (JSON pointer suffix such as '/properties/x', subschema);
    values that are not schemas (enum, const, default, examples...) are never entered."""
    for keyword in SCHEMA_MAPS:
        table = schema.get(keyword)
        if isinstance(table, dict):
            for name, sub in table.items():
                yield f"/{keyword}/{_escape(name)}", sub
    for keyword in SCHEMA_ONE:
        sub = schema.get(keyword)
        if isinstance(sub, dict):
            yield f"/{keyword}", sub
    for keyword in SCHEMA_LISTS:
        items = schema.get(keyword)
        if isinstance(items, list):
            for i, sub in enumerate(items):
                yield f"/{keyword}/{i}", sub


def _escape(name: str) -> str:
    """A key as a JSON pointer token (RFC 6901)."""
    return str(name).replace("~", "~0").replace("/", "~1")


def walk(schema) -> Iterator[tuple[str, dict]]:
    """Every schema object in `schema` (itself included) -> (JSON pointer from the root, e.g. '#/$defs/a'), in
    depth-first order; boolean subschemas are skipped."""
    stack = [(LOCAL_REF_PREFIX, schema)]
    while stack:
        pointer, node = stack.pop()
        if not isinstance(node, dict):
            continue
        yield pointer, node
        stack.extend((pointer + suffix, sub) for suffix, sub in reversed(list(subschemas(node))))


def prepare_schema(schema: dict) -> dict:
    """A copy of `schema` as the compiler gets it: every object schema with `properties` or `patternProperties` and
    no `additionalProperties` / `unevaluatedProperties` gets `additionalProperties: false` (objects inside `allOf` --
    direct members, the targets of their `$ref`s, the schema holding the `allOf` -- are left as written), and every
    integer schema bounds within +-MAX_EXACT_INTEGER (ValueError, naming the schema's place, for a range that lies
    wholly outside)."""
    schema = json_copy(schema)
    in_all_of: set[str] = set()
    nodes = list(walk(schema))
    for pointer, node in nodes:
        for i, member in enumerate(node.get("allOf") or []) if isinstance(node.get("allOf"), list) else ():
            in_all_of.add(f"{pointer}/allOf/{i}")
            if isinstance(member, dict) and isinstance(member.get("$ref"), str):
                in_all_of.add(member["$ref"])
    for pointer, node in nodes:
        if (("properties" in node or "patternProperties" in node) and "additionalProperties" not in node
                and "unevaluatedProperties" not in node and "allOf" not in node and pointer not in in_all_of):
            node["additionalProperties"] = False
        if _is_integer(node):
            _bound_integer(pointer, node)
    return schema


def _is_integer(node: dict) -> bool:
    kind = node.get("type")
    return kind == "integer" or (isinstance(kind, list) and "integer" in kind and "number" not in kind)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bound_integer(pointer: str, node: dict) -> None:
    """Narrow an integer schema's bounds to +-MAX_EXACT_INTEGER in place (ValueError when none of its values is)."""
    low = [node[k] for k in ("minimum", "exclusiveMinimum") if _number(node.get(k))]
    high = [node[k] for k in ("maximum", "exclusiveMaximum") if _number(node.get(k))]
    if any(v > MAX_EXACT_INTEGER for v in low) or any(v < -MAX_EXACT_INTEGER for v in high):
        raise ValueError(f"{pointer}: integer bounds past +-2**53 ({MAX_EXACT_INTEGER}) cannot be generated "
                         f"exactly (a float64 holds integers exactly up to there)")
    lower, upper = ("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")
    for keys, past, default in ((lower, lambda v: v <= -MAX_EXACT_INTEGER, -MAX_EXACT_INTEGER),
                                (upper, lambda v: v >= MAX_EXACT_INTEGER, MAX_EXACT_INTEGER)):
        for key in keys:
            if _number(node.get(key)) and past(node[key]):
                del node[key]  # a bound past the exact range says nothing inside it
        if not any(_number(node.get(key)) for key in keys):
            node[keys[0]] = default


def json_copy(value):
    """A deep copy of JSON data (dicts in their key order, lists, scalars) without recursion (copy.deepcopy
    recurses)."""
    root: list = [None]
    stack = [(root, 0, value)]
    while stack:
        parent, key, item = stack.pop()
        if isinstance(item, dict):
            parent[key] = dict.fromkeys(item)  # the keys in their order (the properties' order is the output's)
            stack.extend((parent[key], k, v) for k, v in item.items())
        elif isinstance(item, list):
            parent[key] = [None] * len(item)
            stack.extend((parent[key], i, v) for i, v in enumerate(item))
        else:
            parent[key] = item
    return root[0]
