"""The one checker of values read from model files: config.json, generation_config.json, tokenizer_config.json,
a safetensors index and GGUF metadata.

A `Rule` says what a field may hold (a JSON boolean, an integer in a range, a positive finite number, a string,
a list of token ids...) and `check_fields` applies a table of rules to a mapping, so a wrong value is refused in
one line naming the file, the field, the value and what is allowed, before anything is built from it. Integers
must be JSON integers: 4.0 and 4.7 are both refused (transformers' own config classes do not turn them into 4
either); a number field accepts an integer (`"rope_theta": 10000`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping


class FieldError(ValueError):
    """A value in a model file that has the wrong type or is out of range."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


@dataclass(frozen=True)
class Rule:
    """What a field may hold: `accepts(value)` and the words for it in an error ("a positive integer")."""

    allowed: str
    accepts: Callable[[Any], bool]
    nullable: bool = False

    def or_null(self) -> "Rule":
        return Rule(f"{self.allowed} or null", self.accepts, nullable=True)

    def check(self, value, where: str, error: type[ValueError] = FieldError) -> None:
        if value is None and self.nullable:
            return
        if not self.accepts(value):
            raise error(f"{where} = {_show(value)}: expected {self.allowed}")


BOOLEAN = Rule("true or false (a JSON boolean)", lambda v: isinstance(v, bool))
STRING = Rule("a string", lambda v: isinstance(v, str))
STRINGS = Rule("a list of strings", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v))
POSITIVE_INT = Rule("a positive integer", lambda v: _is_int(v) and v >= 1)
TOKEN_ID = Rule("a non-negative integer", lambda v: _is_int(v) and v >= 0)
TOKEN_IDS = Rule("a token id (a non-negative integer) or a non-empty list of them",
                 lambda v: _is_int(v) and v >= 0 or isinstance(v, list) and bool(v)
                 and all(_is_int(t) and t >= 0 for t in v))
POSITIVE_NUMBER = Rule("a finite number > 0", lambda v: _is_number(v) and v > 0)  # an integer is a number too
OBJECT = Rule("an object", lambda v: isinstance(v, dict))


def check_fields(values: Mapping, rules: Mapping[str, Rule], source: str,
                 error: type[ValueError] = FieldError) -> None:
    """Check every field of `rules` that `values` has (a missing field is the caller's business: most have
    defaults). `source` names the file, and the object inside it when it is nested ("config.json: rope_scaling");
    `error` is the exception class the caller's users catch (a subclass of ValueError)."""
    for name, rule in rules.items():
        if name in values:
            rule.check(values[name], f"{source}: {name}", error)


def check_in_vocabulary(ids, vocab_size: int, where: str, error: type[ValueError] = FieldError) -> None:
    """Token ids read from a file (`where` names file and field; None entries are absent ids) must lie inside
    the vocabulary."""
    outside = [i for i in ids if i is not None and i >= vocab_size]
    if outside:
        raise error(f"{where} = {outside[0]} is outside the vocabulary (expected 0..{vocab_size - 1}, "
                    f"vocab_size={vocab_size})")


def expect_object(value, source: str, error: type[ValueError] = FieldError) -> dict:
    """A parsed JSON file or part of one that must be an object (not a list, string or number)."""
    if not isinstance(value, dict):
        raise error(f"{source}: expected a JSON object, got {_json_kind(value)} {_show(value)}")
    return value


def _json_kind(value) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return kinds.get(type(value), "null" if value is None else type(value).__name__)


def _show(value) -> str:
    """The value as the user wrote it (JSON spelling for the constants), shortened to stay on one line."""
    if value is True or value is False or value is None:
        text = {True: "true", False: "false", None: "null"}[value]
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
