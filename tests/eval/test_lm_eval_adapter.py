"""The lm-eval adapter against lm-eval's own `hf` model on the same tiny checkpoints, offline.

The reference for a dropped model is transformers' model with the dropped modules replaced by zero deltas
(conftest.hf_model), handed to lm-eval's HFLM as a preloaded model object.
"""
from __future__ import annotations

import os

import pytest

# lm-eval==0.4.13 is installed by the Makefile's venv recipe. Everything here runs offline.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from helpers import hf_model  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from llmdrop_rt.eval.lm_eval_adapter import LLMDropLM, local_task_manager, parse_drop_arg  # noqa: E402

CASES = [  # (tiny model, dropped attention, dropped MLPs)
    ("llama3", [], []),
    ("llama3", [1, 3], [2]),
    ("mistral", [0, 2], []),  # sliding window 7 (< every prompt here) and GQA with one K/V head
]


def reference_lm(folder, drop_attn, drop_mlp, batch_size=3):
    from transformers import AutoTokenizer

    return HFLM(pretrained=hf_model(folder, drop_attn, drop_mlp), tokenizer=AutoTokenizer.from_pretrained(folder),
                batch_size=batch_size, device="cpu")


def evaluate(lm, limit):
    return lm_eval.simple_evaluate(model=lm, tasks=["llmdrop_mc", "llmdrop_tempest"], task_manager=local_task_manager(),
                                   log_samples=True, limit=limit, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)


@pytest.mark.parametrize("name,drop_attn,drop_mlp", CASES)
def test_loglikelihoods_equal_hf_model(tiny_checkpoints, name, drop_attn, drop_mlp):
    folder = tiny_checkpoints[name]
    ours = LLMDropLM(pretrained=str(folder), drop_attn=";".join(map(str, drop_attn)),
                     drop_mlp=";".join(map(str, drop_mlp)), batch_size=5)
    assert ours.llm.plan.drop_attn == set(drop_attn) and ours.llm.plan.drop_mlp == set(drop_mlp)
    got, want = evaluate(ours, limit=12), evaluate(reference_lm(folder, drop_attn, drop_mlp), limit=12)

    # Multiple choice: every choice's log-likelihood and greedy flag, document by document.
    for a, b in zip(got["samples"]["llmdrop_mc"], want["samples"]["llmdrop_mc"], strict=True):
        assert a["doc_id"] == b["doc_id"]
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip([r[0] for r in a["resps"]], [r[0] for r in b["resps"]]):
            assert ll_a == pytest.approx(ll_b, rel=1e-5, abs=1e-3)
            assert greedy_a == greedy_b
    for metric in ("acc,none", "acc_norm,none"):
        assert got["results"]["llmdrop_mc"][metric] == want["results"]["llmdrop_mc"][metric]

    # Rolling: the passages are longer than the 256-token context, so several windows are summed per passage.
    for a, b in zip(got["samples"]["llmdrop_tempest"], want["samples"]["llmdrop_tempest"], strict=True):
        assert a["resps"][0][0] == pytest.approx(b["resps"][0][0], rel=1e-5)
    assert got["results"]["llmdrop_tempest"]["bits_per_byte,none"] == pytest.approx(
        want["results"]["llmdrop_tempest"]["bits_per_byte,none"], rel=1e-5)


def test_batching_does_not_change_scores(tiny_checkpoints):
    """Right padding inside a batch must not leak into shorter rows (batch 1 vs a mixed-length batch)."""
    folder = tiny_checkpoints["llama2"]
    requests = [Instance("loglikelihood", {}, (ctx, cont), i) for i, (ctx, cont) in enumerate(
        [("The cat sat on", " the mat"), ("A", " b c d e f g h"), ("Once upon a time there was", " a king"),
         ("x", "y")])]
    one = LLMDropLM(pretrained=str(folder), batch_size=1).loglikelihood(requests, disable_tqdm=True)
    many = LLMDropLM(pretrained=str(folder), batch_size=4).loglikelihood(requests, disable_tqdm=True)
    for (a, _), (b, _) in zip(one, many):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4)


def test_generate_until_equals_hf_model(tiny_checkpoints):
    folder = tiny_checkpoints["llama3"]
    drop_attn = [2]
    kwargs = {"until": ["e"], "max_gen_toks": 12, "do_sample": False}
    requests = [Instance("generate_until", {}, (ctx, kwargs), i)
                for i, ctx in enumerate(["Hello there", "The quick brown fox", "a"])]
    ours = LLMDropLM(pretrained=str(folder), drop_attn=drop_attn, batch_size=2).generate_until(requests, True)
    want = reference_lm(folder, drop_attn, []).generate_until(requests, True)
    assert ours == want
    assert all("e" not in text for text in ours)


def test_bad_arguments_are_named(tiny_checkpoints):
    folder = str(tiny_checkpoints["llama2"])
    with pytest.raises(ValueError, match="batch_size='auto'"):
        LLMDropLM(pretrained=folder, batch_size="auto")
    with pytest.raises(ValueError, match="max_length=999"):
        LLMDropLM(pretrained=folder, max_length=999)
    with pytest.raises(ValueError, match=r"drop_attn\[0\] = 7: out of range for 4 layers"):
        LLMDropLM(pretrained=folder, drop_attn="7")


def test_parse_drop_arg():
    assert parse_drop_arg("20;22;24-26") == [20, 22, 24, 25, 26]
    assert parse_drop_arg("1:3") == [1, 3]
    assert parse_drop_arg(5) == [5]
    assert parse_drop_arg("") == []
    assert parse_drop_arg(None) is None


def test_cli_eval_writes_results(tiny_checkpoints, tmp_path, capsys):
    from llmdrop_rt.cli import main

    out = tmp_path / "results.json"
    main(["eval", "--model", str(tiny_checkpoints["llama2"]), "--drop-attn", "1", "--tasks", "llmdrop_mc",
          "--limit", "4", "--batch-size", "3", "--offline", "--out", str(out)])
    import json

    report = json.loads(out.read_text())
    assert report["model"]["drop_attn_list"] == [1]
    row = report["summary"][0]
    assert row["task"] == "llmdrop_mc" and row["n_shot"] == 0 and row["metric"] == "acc_norm,none"
    assert 0.0 <= row["value"] <= 1.0
    assert "| llmdrop_mc | 0 | acc_norm,none |" in capsys.readouterr().out
