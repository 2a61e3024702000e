"""Checks of the values a caller hands us, one place for the Python API and the command line alike.

A value that would mean something other than what was written is refused with an `ArgumentError` naming the
argument, the value and what is allowed: a reversed layer range, a stop string that is empty or a string where a
list belongs, a token id outside the vocabulary, a sampling parameter of the wrong type or range. Strings are never
coerced to numbers and booleans are never taken for integers.
"""
from __future__ import annotations

import math
import numbers
import re

# More layers than any model has: a layer range is bounded by this before it is expanded.
MAX_LAYERS = 1 << 16
SEED_LIMIT = 1 << 64  # torch.Generator.manual_seed takes seeds below this

_LAYER_ENTRY = re.compile(r"([0-9]+)(?:\s*-\s*([0-9]+))?")


class ArgumentError(ValueError):
    """An argument whose value we cannot honour as given."""


def parse_layer_list(text: str | None, name: str = "layer list") -> list[int] | None:
    """'1,3,5-7' -> [1, 3, 5, 6, 7]; None keeps config.json's list; '' means drop nothing.

    Refused, naming the entry: anything but N or N-M with M >= N, negative numbers, a layer listed twice (also
    through overlapping ranges), and indices of MAX_LAYERS or more (checked before a range is expanded)."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ArgumentError(f"{name}: expected text such as '20,22,24-26', got {type(text).__name__} {text!r}")
    layers: list[int] = []
    listed_by: dict[int, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        first, last = _layer_range(entry, name)
        for layer in range(first, last + 1):
            if layer in listed_by:
                raise ArgumentError(f"{name}: layer {layer} is listed twice ({listed_by[layer]!r} and {entry!r})")
            listed_by[layer] = entry
            layers.append(layer)
    return layers


def _layer_range(entry: str, name: str) -> tuple[int, int]:
    match = _LAYER_ENTRY.fullmatch(entry)
    if match is None:
        if entry.startswith("-") and _LAYER_ENTRY.fullmatch(entry[1:]):
            raise ArgumentError(f"{name}: entry {entry!r} is negative; layer indices start at 0")
        raise ArgumentError(f"{name}: bad entry {entry!r}: expected N or N-M (layer indices from 0)")
    first = int(match.group(1))
    last = first if match.group(2) is None else int(match.group(2))
    if last < first:
        raise ArgumentError(f"{name}: range {entry!r} is reversed; write {last}-{first}")
    if last >= MAX_LAYERS:
        raise ArgumentError(f"{name}: layer {last} in {entry!r} is beyond any model (indices below {MAX_LAYERS})")
    return first, last


def integer(name: str, value, minimum: int | None = None, limit: int | None = None) -> int:
    """`value` as an int (an int, not a bool, str or float), with minimum <= value < limit."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    if limit is not None and value >= limit:
        raise ArgumentError(f"{name} must be below {limit}, got {value}")
    return value


def real(name: str, value) -> float:
    """`value` as a finite float (an int or float, not a bool or str)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ArgumentError(f"{name} must be a finite number, got {value}")
    return value


def sampling_values(temperature, top_k, top_p, seed) -> tuple[float, int, float, int | None]:
    """The sampling parameters checked: temperature >= 0 (0 = greedy), top_k >= 0 (0 = off), top_p in (0, 1],
    seed None or an integer in [0, 2**64)."""
    temperature = real("temperature", temperature)
    if temperature < 0:
        raise ArgumentError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    top_k = integer("top_k", top_k, minimum=0)
    top_p = real("top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise ArgumentError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    seed = None if seed is None else integer("seed", seed, minimum=0, limit=SEED_LIMIT)
    return temperature, top_k, top_p, seed


def max_new_tokens(value) -> int:
    return integer("max_new_tokens", value, minimum=1)


def stop_strings(stop) -> list[str]:
    """None or [] -> no stop strings; one string is one stop string (never its characters); a list or tuple of
    non-empty strings as it is. An empty stop string would cut every output to nothing, so it is refused."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise ArgumentError(f"stop must be a string or a list of strings, got {type(stop).__name__} {stop!r}")
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise ArgumentError(f"stop[{i}] must be a string, got {type(s).__name__} {s!r}")
        if not s:
            raise ArgumentError(f"stop[{i}] is an empty string, which would cut every output to nothing")
    return list(stop)


def token_ids(ids, vocab_size: int, name: str = "token ids") -> list[int]:
    """A sequence of token ids, each an integer in [0, vocab_size)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ArgumentError(f"{name} must be a list of integers, got {type(ids).__name__} {ids!r}")
    checked = []
    for pos, token in enumerate(ids):
        if hasattr(token, "item") and getattr(token, "ndim", 1) == 0:  # a 0-d tensor or numpy scalar
            token = token.item()
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise ArgumentError(f"{name}[{pos}] = {token!r}: expected an integer token id")
        if not 0 <= token < vocab_size:
            raise ArgumentError(f"{name}[{pos}] = {token}: outside the vocabulary (ids 0..{vocab_size - 1})")
        checked.append(int(token))
    return checked
