"""YAML text to plain values, remembering the line each value was written on.

Every journey error must point at a line, but pydantic only knows where a value
sits in the tree (`stages.2.transitions.0.to`). So the document is walked node
by node and each path gets the line it was written on.

Scalars follow YAML 1.2 rather than PyYAML's YAML 1.1 defaults: `on`, `yes` and
`off` are text (a transition's `on:` must stay a key, not become `True`), `09:00`
is a clock time rather than the number 540, and dates stay text for pydantic to
parse. Only plain data comes out: no Python tags, and no aliases, so a small
file cannot expand into a huge one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import yaml

Key: TypeAlias = str | int | float | bool | None
YamlPath: TypeAlias = tuple[Key, ...]
Plain: TypeAlias = "dict[Key, Plain] | list[Plain] | Key"

_TAG = "tag:yaml.org,2002:"
# Far deeper than any journey needs: a matcher in a transition's `where` is eight down.
MAX_DEPTH = 64
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|false)$", re.IGNORECASE)
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class YamlError(Exception):
    """A document that is not valid YAML, or uses YAML this loader refuses."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Lines:
    """The line of every value of one document, by its path."""

    table: Mapping[YamlPath, int]

    def __contains__(self, path: object) -> bool:
        return path in self.table

    def line_of(self, path: Sequence[Key]) -> int:
        """The line of `path`, or of its longest prefix that was written (a value may be
        missing, or given in a shorter form than the path expects)."""
        for end in range(len(path), -1, -1):
            line = self.table.get(tuple(path[:end]))
            if line is not None:
                return line
        return 1


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars, no aliases, and a bounded
    depth: the composer recurses once per level, so `[[[[...` a few hundred deep would
    otherwise end in a RecursionError instead of an error at a line."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):  # which leaves the alias in `current_event`
            alias: yaml.AliasEvent = self.current_event
            line = alias.start_mark.line + 1 if alias.start_mark else 1
            raise YamlError(line, "aliases (*name) are not supported: write the value out")
        if self._depth >= MAX_DEPTH:
            start = self.current_event.start_mark  # the node's first event, peeked above
            line = start.line + 1 if start else 1
            raise YamlError(line, f"nested more than {MAX_DEPTH} levels deep")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# A registry of its own, so none of PyYAML's YAML 1.1 resolvers (yes, on, 1:30, dates) apply.
_Loader.yaml_implicit_resolvers = {}
_Loader.add_implicit_resolver(_TAG + "null", _NULL, ["~", "n", "N", ""])
_Loader.add_implicit_resolver(_TAG + "bool", _BOOL, list("tTfF"))
_Loader.add_implicit_resolver(_TAG + "int", _INT, list("-+0123456789"))
_Loader.add_implicit_resolver(_TAG + "float", _FLOAT, list("-+0123456789."))


def load(text: str) -> tuple[Plain, Lines]:
    """The document in `text` as plain values, with the line of each; raises YamlError."""
    try:
        # The reader refuses control characters (NUL, ...) as soon as it is made.
        loader = _Loader(text)
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, error.position) + 1
        code = error.character if isinstance(error.character, int) else ord(error.character)
        raise YamlError(line, f"bad YAML: character U+{code:04X} is not allowed") from None
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        what = ", ".join(part for part in (error.context, error.problem) if part)
        raise YamlError(mark.line + 1 if mark else 1, f"bad YAML: {what}") from None
    except yaml.YAMLError as error:
        raise YamlError(1, f"bad YAML: {error}") from None
    finally:
        loader.dispose()
    if root is None:
        return None, Lines({(): 1})
    lines: dict[YamlPath, int] = {(): _line(root)}
    return _value(root, (), lines), Lines(lines)


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _value(node: yaml.Node, path: YamlPath, lines: dict[YamlPath, int]) -> Plain:
    if isinstance(node, yaml.CollectionNode) and node.tag not in (_TAG + "map", _TAG + "seq"):
        raise YamlError(_line(node), f"unsupported tag {_short(node.tag)}")
    if isinstance(node, yaml.MappingNode):
        mapping: dict[Key, Plain] = {}
        for key_node, value_node in node.value:
            key = _key(key_node)
            if key in mapping:
                first = lines[(*path, key)]
                raise YamlError(_line(key_node), f"duplicate key {key!r} (first on line {first})")
            lines[(*path, key)] = _line(key_node)
            mapping[key] = _value(value_node, (*path, key), lines)
        return mapping
    if isinstance(node, yaml.SequenceNode):
        items: list[Plain] = []
        for index, item_node in enumerate(node.value):
            lines[(*path, index)] = _line(item_node)
            items.append(_value(item_node, (*path, index), lines))
        return items
    return _scalar(node)


def _key(node: yaml.Node) -> Key:
    if not isinstance(node, yaml.ScalarNode):
        raise YamlError(_line(node), "a key must be a single word or value, not a list or mapping")
    return _scalar(node)


def _scalar(node: yaml.Node) -> Key:
    text: str = node.value
    tag = node.tag.removeprefix(_TAG)
    try:
        if tag == "str":
            return text
        if tag == "null" and _NULL.match(text):
            return None
        if tag == "bool" and _BOOL.match(text):
            return text.lower() == "true"
        if tag == "int":
            return int(text, 0) if text[:2] in ("0o", "0x") else int(text, 10)
        if tag == "float":
            return _float(text)
    except ValueError:
        pass
    if tag not in ("null", "bool", "int", "float"):
        raise YamlError(_line(node), f"unsupported tag {_short(node.tag)}")
    raise YamlError(_line(node), f"cannot read {text!r} as {_short(node.tag)}")


def _short(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


def _float(text: str) -> float:
    special = text.lower().lstrip("+")
    if special in (".inf", "-.inf"):
        return -math.inf if special.startswith("-") else math.inf
    if special == ".nan":
        return math.nan
    return float(text)
