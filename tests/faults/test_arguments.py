"""Arguments that would mean something else are refused, by one validation layer (llmdrop_rt.arguments) that the
Python API and the command line share: layer lists, sampling parameters, stop strings, token ids, kernel modes."""
from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmdrop_rt
from llmdrop_rt.arguments import MAX_LAYERS, ArgumentError, parse_layer_list
from llmdrop_rt.config import ConfigError, DropPlan

# --- layer lists (property-based) -------------------------------------------------------------------------------

disjoint_ranges = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 3)), max_size=8).map(
    lambda spans: _disjoint(spans))


def _disjoint(spans):
    """(start, length) pairs -> non-overlapping (first, last) ranges, in the order given."""
    taken, ranges = set(), []
    for start, length in spans:
        layers = set(range(start, start + length + 1))
        if not layers & taken:
            taken |= layers
            ranges.append((start, start + length))
    return ranges


def _text(ranges, spaces: bool):
    sep = ", " if spaces else ","
    return sep.join(str(a) if a == b else (f"{a} - {b}" if spaces else f"{a}-{b}") for a, b in ranges)


@given(disjoint_ranges, st.booleans())
def test_a_layer_list_is_its_entries_expanded_in_order(ranges, spaces):
    expected = [layer for a, b in ranges for layer in range(a, b + 1)]
    assert parse_layer_list(_text(ranges, spaces)) == expected


@given(st.integers(0, 500), st.integers(1, 500))
def test_a_reversed_range_is_refused_by_name(low, gap):
    entry = f"{low + gap}-{low}"
    with pytest.raises(ArgumentError, match=f"range '{entry}' is reversed; write {low}-{low + gap}"):
        parse_layer_list(f"0,{entry}" if low else entry)


@given(disjoint_ranges.filter(bool), st.data())
def test_a_layer_listed_twice_is_named(ranges, data):
    first, last = data.draw(st.sampled_from(ranges))
    repeated = data.draw(st.integers(first, last))
    with pytest.raises(ArgumentError, match=f"layer {repeated} is listed twice"):
        parse_layer_list(_text(ranges, False) + f",{repeated}")


@given(st.integers(MAX_LAYERS, 10**30))
def test_a_huge_range_is_refused_before_it_is_expanded(last):
    started = time.perf_counter()
    with pytest.raises(ArgumentError, match=f"layer {last} in '0-{last}' is beyond any model"):
        parse_layer_list(f"0-{last}")
    assert time.perf_counter() - started < 0.1  # nothing of the size of the range was built


@given(st.integers(1, 10**6))
def test_a_negative_entry_is_named(value):
    with pytest.raises(ArgumentError, match=f"entry '-{value}' is negative"):
        parse_layer_list(f"1,-{value}")


@settings(max_examples=300)
@given(st.text(alphabet="0123456789-, x.\u0663", max_size=12))
def test_any_text_is_a_layer_list_or_an_argument_error(text):
    try:
        layers = parse_layer_list(text)
    except ArgumentError as e:
        assert str(e).startswith("layer list: ")
    else:
        assert len(set(layers)) == len(layers) and all(0 <= layer < MAX_LAYERS for layer in layers)


@given(st.lists(st.integers(0, 40), min_size=1, max_size=6, unique=True), st.integers(1, 40))
def test_a_parsed_list_out_of_the_models_range_names_the_entry(layers, num_layers):
    text = ",".join(map(str, layers))
    outside = [(i, v) for i, v in enumerate(layers) if v >= num_layers]
    if not outside:
        assert DropPlan.create(num_layers + 1, parse_layer_list(text)).drop_attn == set(layers)
        return
    pos, value = outside[0]
    with pytest.raises(ConfigError, match=rf"drop_attn_list\[{pos}\] = {value}: out of range for {num_layers} layers"):
        DropPlan.create(num_layers, parse_layer_list(text))


def test_the_cli_refuses_bad_drop_lists_before_loading(capsys):
    from llmdrop_rt.cli import main

    for text, message in (("5-2", "range '5-2' is reversed"), ("0-99999999999", "layer 99999999999 in"),
                          ("1,1", "layer 1 is listed twice"), ("a", "bad entry 'a'")):
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", "--model", "/nonexistent", "--prompt", "x", "--drop-attn", text])
        assert exit_info.value.code == 2
        assert f"argument --drop-attn: layer list: {message}" in capsys.readouterr().err


def test_a_drop_list_argument_out_of_the_models_range_is_named_as_the_argument(tiny_checkpoints, tmp_path, capsys):
    from llmdrop_rt.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(tiny_checkpoints["llama2"]), "--drop-mlp", "1,7", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: drop_mlp[1] = 7: out of range for 4 layers (0..3)\n"


# --- generation arguments ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return llmdrop_rt.load(tiny_checkpoints["llama2"], device="cpu")


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": "0.5"}, "temperature must be a number, got str '0.5'"),
    ({"temperature": -0.1}, r"temperature must be >= 0 \(0 = greedy\), got -0.1"),
    ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
    ({"top_p": 2}, r"top_p must be in \(0, 1\] \(1 = off\), got 2.0"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
    ({"top_k": 2.5}, "top_k must be an integer, got float 2.5"),
    ({"top_k": -1}, "top_k must be >= 0, got -1"),
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 1, got -1"),
    ({"max_new_tokens": 1.5}, "max_new_tokens must be an integer, got float 1.5"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer, got bool True"),
    ({"seed": "1"}, "seed must be an integer, got str '1'"),
    ({"seed": 1.0}, "seed must be an integer, got float 1.0"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
    ({"seed": 2**64}, "seed must be below 18446744073709551616"),
    ({"stop": [""]}, r"stop\[0\] is an empty string"),
    ({"stop": ["ok", 3]}, r"stop\[1\] must be a string, got int 3"),
    ({"stop": {"a"}}, "stop must be a string or a list of strings, got set"),
])
@pytest.mark.parametrize("method", ["generate", "generate_ids", "stream"])
def test_bad_generation_arguments_are_named(llm, method, kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        result = getattr(llm, method)("hello", **{"max_new_tokens": 2, **kwargs})
        list(result)  # stream is lazy


def test_a_stop_string_is_one_string_not_its_characters(llm):
    def candidates(text):
        """Two ASCII characters first seen together at i, the first of them seen alone before (split into
        characters, the stop would cut earlier), in a stretch of plain ASCII (no partial UTF-8 while streaming)."""
        for i in range(1, len(text) - 1):
            pair = text[i:i + 2]
            if text[:i + 2].isascii() and pair.isprintable() and pair not in text[:i + 1] and text[i] in text[:i]:
                yield pair

    found = ((prompt, text, stop) for prompt in ("The", "Once", "A", "In the", "It", "We", "So", "Hi")
             for text in llm.generate(prompt, max_new_tokens=24) for stop in candidates(text))
    prompt, text, stop = next(found)
    cut = text[: text.index(stop)]
    assert llm.generate(prompt, max_new_tokens=24, stop=stop) == [cut]
    assert "".join(llm.stream(prompt, max_new_tokens=24, stop=stop)) == cut
    assert llm.generate(prompt, max_new_tokens=24, stop=[stop]) == [cut]


@pytest.mark.parametrize("prompt, message", [
    ([[5, 300]], r"prompts\[0\]\[1\] = 300: outside the vocabulary \(ids 0..299\)"),
    ([[-1, 5]], r"prompts\[0\]\[0\] = -1: outside the vocabulary"),
    ([[5, 2.0]], r"prompts\[0\]\[1\] = 2.0: expected an integer token id"),
    ([5, 10**6], r"prompts\[0\]\[1\] = 1000000: outside the vocabulary"),
    (None, "prompts must be a string, token ids, or a non-empty list of either, got NoneType"),
])
def test_token_ids_outside_the_vocabulary_are_refused(llm, prompt, message):
    with pytest.raises(ArgumentError, match=message):
        llm.generate_ids(prompt, max_new_tokens=1)


def test_logits_refuse_ids_outside_the_vocabulary(llm):
    with pytest.raises(ArgumentError, match=r"token id 300 is outside the vocabulary \(ids 0..299\)"):
        llm.logits([[1, 300]])
    with pytest.raises(ArgumentError, match="tokens must be integer token ids"):
        llm.logits(torch.zeros(1, 3))
    assert llm.logits([1, 299]).shape == (1, 2, 300)


def test_the_kernels_variable_and_argument_are_checked_alike(tiny_checkpoints, monkeypatch):
    folder = tiny_checkpoints["llama2"]
    with pytest.raises(ValueError, match=r"kernels='bogus' is not one of"):
        llmdrop_rt.load(folder, device="cpu", kernels="bogus")
    monkeypatch.setenv("LLMDROP_RT_KERNELS", "bogus")
    with pytest.raises(ValueError, match=r"\$LLMDROP_RT_KERNELS='bogus' is not one of"):
        llmdrop_rt.load(folder, device="cpu")
