"""Chat templates: found where transformers looks for them, rendered in a jinja2 sandbox with bounded work.

Where a template comes from, as transformers reads a folder: `chat_template.jinja` (what transformers writes
now) takes precedence over tokenizer_config.json's `chat_template`, which is a string or a list of named templates
({"name", "template"}) of which the one named "default" is used.

Rendering offers what transformers' renderer offers templates (`raise_exception(msg)`, `strftime_now(fmt)`, a
`tojson` that keeps non-ASCII text, `{% break %}` / `{% continue %}`, the `{% generation %}` block) in jinja2's
immutable sandbox, so a template cannot reach Python internals or change its inputs. Work is bounded without
signals or threads (so it holds when rendering runs in any thread): every loop over `range`, every call and every
piece of output counts against a wall-clock deadline and a step budget, and no value a template builds (with `+`,
`*`, `**`, a call, a namespace assignment) or renders may pass a size limit. A template over its bounds ends with
`ChatTemplateError`.
"""
from __future__ import annotations

import json
import operator
import time
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
DEADLINE_S = 2.0  # wall-clock bound of one rendering
MAX_STEPS = 1_000_000  # loop iterations over range() plus calls, per rendering
MAX_SIZE = 1_000_000  # characters (or items) of any value built by * or **, and of the rendered text


class ChatTemplateError(ValueError):
    """A chat template that cannot be read, refuses the conversation (raise_exception) or runs past its bounds."""


def find_chat_template(folder: Path, tokenizer_config: dict, config_path: Path) -> str | None:
    """The folder's chat template text, or None when it has none."""
    template_file = folder / TEMPLATE_FILE
    if template_file.is_file():
        try:
            return template_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ChatTemplateError(f"{template_file}: not UTF-8 text ({e})") from None
    template = tokenizer_config.get("chat_template")
    where = f"{config_path}: chat_template"
    if template is None or isinstance(template, str):
        return template
    named = template if isinstance(template, list) else None
    if named is None or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                and isinstance(t.get("template"), str) for t in named):
        raise ChatTemplateError(f"{where}: expected a string or a list of {{\"name\", \"template\"}} objects, "
                                f"got {json.dumps(template)[:60]}")
    by_name = {t["name"]: t["template"] for t in named}
    if "default" not in by_name:
        raise ChatTemplateError(f"{where}: the named templates {sorted(by_name)} include no 'default'")
    return by_name["default"]


class _Budget:
    """The deadline and step count of one rendering."""

    def __init__(self):
        self.deadline = time.monotonic() + DEADLINE_S
        self.steps = 0

    def step(self, count: int = 1):
        self.steps += count
        if self.steps > MAX_STEPS or time.monotonic() > self.deadline:
            raise ChatTemplateError(f"the chat template did not finish within its bounds ({DEADLINE_S:g} s, "
                                    f"{MAX_STEPS} loop steps and calls); it stopped after {self.steps} steps")


class _GenerationBlock(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (marks assistant text for training masks): the body
    renders as it is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _CountedRange:
    """A range whose every step counts against the budget (length, indexing and reversal work as on a range)."""

    def __init__(self, values: range, budget: _Budget):
        self.values, self.budget = values, budget

    def __len__(self):
        return len(self.values)

    def __getitem__(self, index):
        item = self.values[index]
        return _CountedRange(item, self.budget) if isinstance(item, range) else item

    def __iter__(self):
        for value in self.values:
            self.budget.step()
            yield value

    def __reversed__(self):
        return iter(_CountedRange(self.values[::-1], self.budget))


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every call and range step counted, and * / ** bounded in size."""

    intercepted_binops = frozenset({"+", "*", "**"})

    def __init__(self, budget: _Budget):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock])
        self.budget = budget
        self.globals.update(range=self._range, raise_exception=_raise_exception, strftime_now=_strftime_now,
                            namespace=_BoundedNamespace)
        self.filters["tojson"] = _tojson

    def _range(self, *args):
        values = range(*args)
        if len(values) > MAX_SIZE:
            raise ChatTemplateError(f"the chat template asked for range{args}: more than {MAX_SIZE} items")
        return _CountedRange(values, self.budget)

    def call(self, context, obj, *args, **kwargs):
        self.budget.step()
        for value in (*args, *kwargs.values()):
            _check_size(value, "a call argument")
        return _check_size(super().call(context, obj, *args, **kwargs), "a call's result")

    def call_binop(self, context, operator_name, left, right):
        if operator_name == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                and right * abs(left).bit_length() > 8 * MAX_SIZE:
            raise ChatTemplateError(f"the chat template computes an integer power of over {8 * MAX_SIZE} bits")
        if operator_name == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and _is_number(count) and len(sequence) * count > MAX_SIZE:
                    raise ChatTemplateError(f"the chat template repeats a value {count} times: more than "
                                            f"{MAX_SIZE} items")
        result = {"+": operator.add, "*": operator.mul, "**": operator.pow}[operator_name](left, right)
        return _check_size(result, "a sum")


class _BoundedNamespace(jinja2.utils.Namespace):
    """`namespace(...)`, the one mutable value a template has: no underscore attributes (as transformers
    refuses), no value beyond the size limit (a loop doubling a string would otherwise exhaust memory)."""

    def __init__(*args, **kwargs):  # jinja2's signature trick: `namespace(self=...)` stays possible
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name, value in attrs.items():
            _BoundedNamespace._check(name, value)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _BoundedNamespace._check(name, value)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name, value):
        if isinstance(name, str) and name.startswith("_"):
            raise ChatTemplateError(f"the chat template sets the namespace attribute {name!r} (underscore names "
                                    "are refused)")
        _check_size(value, f"namespace attribute {name!r}")


def _check_size(value, what: str):
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_SIZE:
        raise ChatTemplateError(f"the chat template built {what} of {len(value)} items (more than {MAX_SIZE})")
    return value


def render_chat_template(template: str, source: str, **variables) -> str:
    """The template rendered with `variables`; any failure is a ChatTemplateError naming `source`."""
    budget = _Budget()
    env = _BoundedSandbox(budget)
    try:
        compiled = env.from_string(template)
        pieces, size = [], 0
        for piece in compiled.generate(**variables):
            size += len(piece)
            if size > MAX_SIZE:
                raise ChatTemplateError(f"the chat template's output passed {MAX_SIZE} characters")
            budget.step()
            pieces.append(piece)
        return "".join(pieces)
    except ChatTemplateError as e:
        raise ChatTemplateError(f"{source}: {e}") from None
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{source}: chat template syntax error at line {e.lineno}: {e.message}") from None
    except jinja2.TemplateError as e:  # raise_exception(msg), sandbox refusals, undefined names
        raise ChatTemplateError(f"{source}: chat template refused to render: {e.message or e}") from None
    except RecursionError:
        raise ChatTemplateError(f"{source}: chat template recursed too deeply") from None
    except Exception as e:  # whatever an untrusted template makes the objects it touches raise
        raise ChatTemplateError(f"{source}: chat template failed: {type(e).__name__}: {e}") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _raise_exception(message):
    raise jinja2.TemplateError(str(message))


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson: plain JSON, non-ASCII kept (jinja2's own escapes HTML characters)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
