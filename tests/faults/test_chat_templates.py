"""Chat templates: read where transformers reads them (chat_template.jinja first, named templates' "default"),
rendered as transformers renders them, with raise_exception / strftime_now, sandboxed and bounded in time and size
(in any thread)."""
from __future__ import annotations

import concurrent.futures
import json
import shutil
import time
from datetime import datetime

import pytest

from llmdrop_rt.io.chat_template import ChatTemplateError, render_chat_template
from llmdrop_rt.io.tokenizer import Tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <there> & \"you\" é"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}]
# What real templates use: loop controls, namespace, tojson, raise_exception, strftime_now, slicing, generation.
TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% continue %}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] | tojson }}{% if m['role'] == 'assistant' %}{% generation %}{{ eos_token }}"
    "{% endgeneration %}{% endif %}\n{% endfor %}"
    "[{{ ns.system }}|{{ strftime_now('%Y') }}|{{ messages[-1:] | length }}]"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def folder(tiny_checkpoints, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_checkpoints["llama2"], target)
    return target


def set_config_template(folder, template):
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config))


def test_rendering_matches_transformers_and_jinja_file_takes_precedence(folder):
    from transformers import AutoTokenizer

    set_config_template(folder, "{{ raise_exception('the older template must not be used') }}")
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    ours = Tokenizer(folder).apply_chat_template(MESSAGES[1:], add_generation_prompt=True)
    theirs = AutoTokenizer.from_pretrained(folder).apply_chat_template(MESSAGES[1:], tokenize=False,
                                                                       add_generation_prompt=True)
    assert ours == theirs
    assert f"|{datetime.now().year}|" in ours and '"Hi <there> & \\"you\\" é"' in ours


def test_named_templates_use_default(folder):
    set_config_template(folder, [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": TEMPLATE}])
    assert Tokenizer(folder).apply_chat_template(MESSAGES[1:2]).startswith("<|user|>")
    set_config_template(folder, [{"name": "tool_use", "template": "TOOLS"}])
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config.json: chat_template: the named templates "
                                                r"\['tool_use'\] include no 'default'"):
        Tokenizer(folder)
    set_config_template(folder, {"default": TEMPLATE})
    with pytest.raises(ChatTemplateError, match="chat_template: expected a string or a list of"):
        Tokenizer(folder)


def test_raise_exception_carries_the_message(folder):
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    with pytest.raises(ChatTemplateError) as caught:
        Tokenizer(folder).apply_chat_template([MESSAGES[2]])  # an assistant turn first
    assert str(caught.value) == (f"{folder}: chat template refused to render: Conversation roles must alternate "
                                 "user/assistant")


def test_no_template_names_both_places(folder):
    set_config_template(folder, None)
    with pytest.raises(ChatTemplateError, match="no chat template .*chat_template.jinja"):
        Tokenizer(folder).apply_chat_template(MESSAGES)


HOSTILE = {
    "nested_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "repeat": "{{ 'x' * 10**9 }}",
    "power": "{{ 7 ** 99999999 }}",
    "doubling_namespace": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                          "{% endfor %}",
    "doubling_macro": "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('ab') }}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "huge_range": "{{ range(10**12) | list | length }}",
    "output": "{% for i in range(5000) %}{{ 'y' * 999 }}{% endfor %}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_end_quickly_with_a_clear_error(name):
    started = time.perf_counter()
    with pytest.raises(ChatTemplateError) as caught:
        render_chat_template(HOSTILE[name], "model-folder", messages=MESSAGES)
    assert time.perf_counter() - started < 3
    assert str(caught.value).startswith("model-folder: ") and "\n" not in str(caught.value)


def test_bounds_hold_in_threads():
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(render_chat_template, HOSTILE["nested_loops"], "f", messages=[]) for _ in range(2)]
        for future in futures:
            with pytest.raises(ChatTemplateError, match="did not finish within its bounds"):
                future.result(timeout=10)


@pytest.mark.parametrize("template", [
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ messages.append(1) }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ self.__init__.__globals__ }}",
])
def test_sandbox_refuses_escapes(template):
    with pytest.raises(ChatTemplateError, match="^f: "):
        render_chat_template(template, "f", messages=[{"role": "user", "content": "x"}])
