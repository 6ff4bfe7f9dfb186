"""How a scenario problem reaches the user: one line per problem, naming the file, the YAML
path of the field, what was found and what was expected.

`collective.scenario` raises a `ScenarioError` with a message built here, from a pydantic
`ValidationError` (`format_validation_error`) or from a `FieldError` its own checks raise
(`format_field_error`). A misspelt key gets the closest real one (`field_names` lists
them all).
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from collective.specs import TopologySpec


class ScenarioError(Exception):
    """A user mistake in a scenario file; the message is meant to be shown as is."""


class FieldError(Exception):
    """A check on a whole scenario failed at one field (`loc`: its YAML path)."""

    def __init__(self, loc: tuple[Any, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def field_names(root: type[BaseModel]) -> set[str]:
    """Every field name of `root` and of every model its fields hold, however deep."""
    names: set[str] = set()
    seen: set[type[BaseModel]] = set()
    todo = [root]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(name)
            todo.extend(_models_in(info.annotation))
    return names


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation names (inside unions, lists, dicts, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def format_field_error(source: str, error: FieldError) -> str:
    return f"{source}: {format_loc(error.loc)}: {error.message}"


def _clean_loc(loc: tuple[Any, ...], data: Any, missing: bool = False) -> tuple[Any, ...]:
    """The YAML path of a pydantic error location: the parts that are keys or indexes of the
    input data. Union tags pydantic inserts (`view.lagged.lag`, `nodes.list[0]`) are not in
    the data and are dropped; so is nothing else, whatever a key's spelling. The last part is
    kept when it names a required field that is absent (`missing`)."""
    cleaned: list[Any] = []
    current = data
    for index, part in enumerate(loc):
        if isinstance(current, dict):
            if part in current:
                cleaned.append(part)
                current = current[part]
            elif missing and index == len(loc) - 1:
                cleaned.append(part)
        elif isinstance(current, list):
            if isinstance(part, int) and 0 <= part < len(current):
                cleaned.append(part)
                current = current[part]
        elif isinstance(current, BaseModel):  # a validated object: keep pydantic's location
            cleaned.append(part)
    return tuple(cleaned)


# what to write when a top-level section is missing (the error names the field; this names the fix)
MISSING_HINTS = {
    "models": " (the models the nodes name, e.g. `models: {smol: smollm2-135m}` with "
    "`node_defaults: {model: smol}`)",
}


def _key_hint(key: str, loc: tuple[Any, ...], known_keys: Collection[str]) -> str:
    """`(did you mean 'round_tokens'?)`, where templates of nodes and topology parameters go,
    or where the docs are."""
    if len(loc) == 2 and loc[0] == "topology" and not difflib.get_close_matches(key, TopologySpec.model_fields, cutoff=0.7):
        return f" (a topology's parameters go under `params:`, e.g. `params: {{{key}: ...}}`)"
    if len(loc) == 1 and ("template" in key or key in ("count", "node_count", "n_nodes")):
        return " (a template of N nodes is written `nodes: {count: N}`, shared settings go in `node_defaults`)"
    # a key valid elsewhere (top_k of evaluation in a controller) is not its own suggestion
    close = difflib.get_close_matches(key, sorted(set(known_keys) - {key}), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}? see scenarios/README.md)"
    return " (check its spelling and the docs in scenarios/README.md)"


def format_validation_error(source: str, error: ValidationError, data: Any, known_keys: Collection[str]) -> str:
    """One line per problem; `known_keys`: every key a scenario may hold (for misspellings)."""
    lines = [f"{source}: the scenario is not valid ({error.error_count()} problem(s)):"]
    for item in error.errors():
        loc = _clean_loc(item["loc"], data, missing=item["type"] == "missing")
        found = item.get("input")
        shown = repr(found) if not isinstance(found, dict) else "a mapping"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key" + _key_hint(str(item["loc"][-1]), loc, known_keys)
        elif item["type"] == "missing":
            message = "this field is required" + MISSING_HINTS.get(format_loc(loc), "")
            shown = "nothing"
        lines.append(f"  - {format_loc(loc)}: {message}; found {shown}")
    return "\n".join(lines)


class RunError(Exception):
    """A run cannot start or go on; the message is meant for the user."""
