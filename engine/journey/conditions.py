"""`where` clauses compiled into plain predicates.

A clause maps a dotted path to a value (equality) or one matcher; all keys must hold.
No code from the journey file is ever evaluated: each matcher is one of a fixed set
of comparisons, compiled once when the journey is loaded.

A missing path matches only `exists: false`, `ne` and `not_in` (as in MongoDB), and a
comparison between values of different types is simply false, never an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.journey.model import Matcher

MISSING: Any = object()

Predicate = Callable[[Any], bool]


def resolve_path(view: Mapping[str, Any], path: str) -> Any:
    """The value at `properties.a.b` in the event view, or MISSING."""
    current: Any = view
    for part in path.split("."):
        if not isinstance(current, Mapping):
            return MISSING
        current = current.get(part, MISSING)
        if current is MISSING:
            return MISSING
    return current


def _comparable(left: Any, right: Any) -> bool:
    if isinstance(left, bool) or isinstance(right, bool):
        return False
    numbers = (int, float)
    return (isinstance(left, numbers) and isinstance(right, numbers)) or (
        isinstance(left, str) and isinstance(right, str)
    )


def _equal(left: Any, right: Any) -> bool:
    # True == 1 in Python; a journey saying `eq: 1` does not mean `true`.
    if isinstance(left, bool) != isinstance(right, bool):
        return False
    return bool(left == right)


def _contains(haystack: Any, needle: Any) -> bool:
    if isinstance(haystack, str):
        return isinstance(needle, str) and needle in haystack
    if isinstance(haystack, list | tuple):
        return any(_equal(item, needle) for item in haystack)
    return False


def _matcher_predicate(operator: str, operand: Any) -> Predicate:
    if operator == "eq":
        return lambda value: value is not MISSING and _equal(value, operand)
    if operator == "ne":
        return lambda value: value is MISSING or not _equal(value, operand)
    if operator in ("in", "not_in") and all(isinstance(o, str) for o in operand):
        # The usual list, of strings (paths, sources, statuses), tested for every event:
        # only a string can equal one, and a set finds it without a loop.
        strings = frozenset(operand)
        if operator == "in":
            return lambda value: isinstance(value, str) and value in strings
        return lambda value: not (isinstance(value, str) and value in strings)
    if operator == "in":
        return lambda value: value is not MISSING and any(_equal(value, o) for o in operand)
    if operator == "not_in":
        return lambda value: value is MISSING or not any(_equal(value, o) for o in operand)
    if operator == "gt":
        return lambda value: _comparable(value, operand) and value > operand
    if operator == "gte":
        return lambda value: _comparable(value, operand) and value >= operand
    if operator == "lt":
        return lambda value: _comparable(value, operand) and value < operand
    if operator == "lte":
        return lambda value: _comparable(value, operand) and value <= operand
    if operator == "startswith":
        return lambda value: isinstance(value, str) and value.startswith(operand)
    if operator == "endswith":
        return lambda value: isinstance(value, str) and value.endswith(operand)
    if operator == "contains":
        return lambda value: _contains(value, operand)
    if operator == "exists":
        return lambda value: (value is not MISSING and value is not None) == operand
    raise ValueError(f"unknown matcher {operator!r}")


class Condition:
    """All clauses of one `where`, ready to test an event view."""

    __slots__ = ("_clauses",)

    def __init__(self, clauses: tuple[tuple[str, Predicate], ...]) -> None:
        self._clauses = clauses

    @property
    def clauses(self) -> tuple[tuple[str, Predicate], ...]:
        """(path, predicate) per clause: what the pure core compiles its own tests from."""
        return self._clauses

    def __call__(self, view: Mapping[str, Any]) -> bool:
        return all(predicate(resolve_path(view, path)) for path, predicate in self._clauses)


def compile_where(where: Mapping[str, Matcher | Any]) -> Condition:
    from engine.journey.model import Matcher

    clauses: list[tuple[str, Predicate]] = []
    for path, expected in where.items():
        if isinstance(expected, Matcher):
            clauses.append((path, _matcher_predicate(expected.operator, expected.operand)))
        else:
            clauses.append((path, _matcher_predicate("eq", expected)))
    return Condition(tuple(clauses))
