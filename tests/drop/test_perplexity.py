"""Perplexity in the runtime against an independent transformers computation; windowing; CLI; plots."""
from __future__ import annotations

import builtins
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import hf_model

import llmdrop_rt
from llmdrop_rt.cli import main
from llmdrop_rt.drop.perplexity import evaluate_perplexity, load_eval_tokens, windows


def reference_perplexity(model, ids: list[int], seq_len: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's loop, written out: each window scores the tokens the previous one did
    not reach (never a window's first token, which has no context)."""
    nll, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        window = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logits = model(window).logits[0].double()
        log_probs = F.log_softmax(logits[:-1], dim=-1)
        for position in range(max(previous_end - begin, 1), end - begin):
            nll -= log_probs[position - 1, ids[begin + position]].item()
            count += 1
        previous_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("name,stride", [("llama2", None), ("mistral", None), ("llama3", 5)])
def test_perplexity_equals_transformers(tiny_checkpoints, name, stride):
    folder = tiny_checkpoints[name]
    ids = torch.randint(2, 300, (47,), generator=torch.Generator().manual_seed(5)).tolist()
    drop_attn, drop_mlp = [1], [2]
    llm = llmdrop_rt.load(folder, drop_attn=drop_attn, drop_mlp=drop_mlp, device="cpu")
    seq_len = 12  # 47 tokens: three full windows and a shorter last one
    ours = evaluate_perplexity(llm.model, ids, seq_len=seq_len, stride=stride, batch_size=2, progress=False)
    expected, count = reference_perplexity(hf_model(folder, drop_attn, drop_mlp), ids, seq_len, stride or seq_len)
    assert ours.tokens_scored == count
    assert ours.perplexity == pytest.approx(expected, rel=1e-5)


def test_windows_score_every_token_once():
    for total, seq_len, stride in [(47, 12, 12), (47, 12, 5), (10, 12, 12), (24, 12, 12), (13, 4, 1)]:
        scored = []
        for begin, end, first in windows(total, seq_len, stride):
            assert end - begin <= seq_len
            scored += range(begin + first, end)
        assert len(scored) == len(set(scored))
        if stride == seq_len:  # non-overlapping: every token but each window's first
            starts = set(range(0, total, seq_len))
            assert sorted(scored) == [p for p in range(total) if p not in starts]
        else:
            assert sorted(scored) == list(range(1, total))


def test_bad_perplexity_input(tiny_checkpoints):
    llm = llmdrop_rt.load(tiny_checkpoints["llama2"], device="cpu")
    with pytest.raises(ValueError, match="seq_len must be in 2..256"):
        evaluate_perplexity(llm.model, list(range(2, 50)), seq_len=300, progress=False)
    with pytest.raises(ValueError, match="stride must be in 1..seq_len=16"):
        evaluate_perplexity(llm.model, list(range(2, 50)), seq_len=16, stride=17, progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate_perplexity(llm.model, [5], progress=False)


def test_cli_ppl_on_a_text_file(tiny_checkpoints, tmp_path, capsys):
    folder = tiny_checkpoints["llama3"]
    text = tmp_path / "eval.txt"
    text.write_text("The river ran past the old mill and on towards the sea. " * 8)
    out = tmp_path / "ppl.json"
    main(["ppl", "--model", str(folder), "--drop-attn", "2", "--text", str(text), "--seq-len", "64",
          "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "attn=[2]" in printed
    import json

    result = json.loads(out.read_text())
    llm = llmdrop_rt.load(folder, drop_attn=[2], device="cpu")
    ids = load_eval_tokens(llm.tokenizer, text)
    assert result["perplexity"] == pytest.approx(
        evaluate_perplexity(llm.model, ids, seq_len=64, progress=False).perplexity, rel=1e-9)


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="plotting is the optional 'plot' extra")
    from llmdrop_rt.drop.plots import plot_importance, plot_sweep

    png = plot_importance({"attn": [0.1, None, 0.3], "mlp": [0.2, 0.25, 0.4], "block": [0.3, 0.3, 0.5]},
                          tmp_path / "imp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = plot_sweep({"attn (cosine)": [(2, 10.0), (4, 12.0)], "mlp (cosine)": [(2, 20.0), (4, 40.0)]},
                     tmp_path / "sweep.png", baseline=9.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plotting_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    from llmdrop_rt.drop.plots import plot_importance

    with pytest.raises(ImportError, match=r"plotting needs matplotlib, the optional 'plot' extra"):
        plot_importance({"attn": [0.1]}, tmp_path / "x.png")
