"""`heal`: LoRA healing of dropped models. Training lowers its loss (both objectives); the written weights are the
source's plus B·A·alpha/rank, equal to peft's own merge on transformers' model of the source; the export loads in
`load()` with logits equal to that merged model's; dropped modules never get weights; the same seed gives the same
checkpoint; bad requests are refused naming the argument.

peft is an optional extra; `make test` installs it (see the Makefile), so these tests run in CI.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import DATA, folder_digest, hf_model
from safetensors import safe_open

import llmdrop_rt
from llmdrop_rt.cli import main
from llmdrop_rt.config import DropPlan
from llmdrop_rt.drop.calibration import load_calibration
from llmdrop_rt.heal import HealError, HealSettings, heal_model
from llmdrop_rt.heal.distill import top_k_kl
from llmdrop_rt.heal.hf_model import load_transformers_model
from llmdrop_rt.heal.lora import kept_projections, lora_config
from llmdrop_rt.io.export import export_model, is_dropped_tensor
from llmdrop_rt.io.tokenizer import Tokenizer
from llmdrop_rt.model.standins import ZeroAttention, ZeroMLP

pytest.importorskip("peft")

# attention of layers 1 and 3, the MLP of layer 2 and the whole of block 4 dropped, of 6 layers
DROP_ATTN, DROP_MLP = [1, 3, 4], [2, 4]
SETTINGS = HealSettings(rank=4, steps=6, batch_size=2, lr=1e-2, seed=3)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}




def training_data(folder: Path):
    return load_calibration(Tokenizer(folder), DATA / "calib.txt", n_samples=6, seq_len=48, seed=0)


@pytest.fixture(scope="module")
def dropped(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama-3 (GQA, tied embeddings) exported with the drops: 'reference' (every weight, drop lists),
    'strip' (kept weights only)."""
    root = tmp_path_factory.mktemp("heal")
    plan = DropPlan.create(6, DROP_ATTN, DROP_MLP)
    source = tiny_checkpoints["llama3"]
    return {"source": source, "plan": plan, "root": root,
            **{fmt: export_model(source, root / fmt, plan, fmt) for fmt in ("reference", "strip")}}


@pytest.fixture(scope="module")
def healed_lm(dropped):
    data = training_data(dropped["strip"])
    before = folder_digest(dropped["strip"])
    result = heal_model(dropped["strip"], dropped["root"] / "healed-lm", data, SETTINGS, progress=False)
    assert folder_digest(dropped["strip"]) == before  # the source is never written
    return result, data


def lm_loss(folder: Path, tokens: torch.Tensor) -> float:
    logits = llmdrop_rt.load(folder, dtype="float32").logits(tokens)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()


def test_lm_healing_lowers_the_training_loss(dropped, healed_lm):
    result, data = healed_lm
    assert result.output_format == "strip" and len(result.losses) == SETTINGS.steps
    assert lm_loss(result.destination, data.tokens) < lm_loss(dropped["strip"], data.tokens) - 0.05


def test_distill_lowers_the_kl_to_the_undropped_model(dropped):
    """The reference export is its own teacher (it holds every weight); the KL is measured on the full
    distributions, though training keeps only the teacher's top 32 of 300 tokens per position."""
    data = training_data(dropped["reference"])
    settings = HealSettings(objective="distill", rank=4, steps=6, batch_size=2, lr=1e-2, top_k=32)
    result = heal_model(dropped["reference"], dropped["root"] / "healed-kd", data, settings, progress=False)
    assert result.teacher == str(dropped["reference"]) and result.output_format == "strip"
    teacher = F.log_softmax(llmdrop_rt.load(dropped["source"]).logits(data.tokens), -1)

    def kl(folder):
        student = F.log_softmax(llmdrop_rt.load(folder).logits(data.tokens), -1)
        return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean().item()

    assert kl(result.destination) < 0.8 * kl(dropped["reference"])


def test_top_k_kl_is_the_kl_over_top_k_and_the_rest():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 37, generator=gen) * 3, torch.randn(2, 5, 37, generator=gen) * 3
    teacher_log_probs = F.log_softmax(teacher, -1)
    full = F.kl_div(F.log_softmax(student, -1), teacher_log_probs, log_target=True, reduction="none").sum(-1).mean()
    top = torch.topk(teacher_log_probs, 37, -1)
    assert torch.allclose(top_k_kl(student, top.values, top.indices), full, atol=1e-5)
    top = torch.topk(teacher_log_probs, 4, -1)  # the partition's KL, computed independently in float64
    p, q = teacher_log_probs.double().exp(), F.softmax(student.double(), -1)
    p_top, q_top = p.gather(-1, top.indices), q.gather(-1, top.indices)
    p_rest, q_rest = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    expected = ((p_top * (p_top / q_top).log()).sum(-1) + p_rest * (p_rest / q_rest).log()).mean()
    got = top_k_kl(student, top.values, top.indices)
    assert abs(got.item() - expected.item()) < 1e-5 and got <= full


def test_merged_weights_are_base_plus_scaled_b_a_and_match_peft(dropped, healed_lm):
    """Every adapted projection is W + B·A·alpha/rank; every other tensor is the source's, bit for bit; peft's own
    merge of the same adapters on transformers' model of the undropped source (dropped modules zeroed) gives the
    same weights and the logits of our runtime on the healed export."""
    import peft

    result, data = healed_lm
    source, out = tensors(dropped["source"]), tensors(result.destination)
    scale = SETTINGS.lora_alpha / SETTINGS.rank
    adapted = {f"{name}.weight" for name in kept_projections(dropped["plan"])}
    for name, weight in out.items():
        if name in adapted:
            a = result.adapters[f"base_model.model.{name[: -len('.weight')]}.lora_A.weight"]
            b = result.adapters[f"base_model.model.{name[: -len('.weight')]}.lora_B.weight"]
            assert torch.allclose(weight, source[name] + scale * b @ a, atol=1e-6), name
            assert not torch.equal(weight, source[name]), name
        else:
            assert torch.equal(weight, source[name]), name

    reference = hf_model(dropped["source"], DROP_ATTN, DROP_MLP)
    reference = peft.get_peft_model(reference, lora_config(dropped["plan"], SETTINGS.rank, SETTINGS.lora_alpha))
    peft.set_peft_model_state_dict(reference, result.adapters)
    merged = reference.merge_and_unload().eval()
    merged_weights = merged.state_dict()
    for name in adapted:
        assert torch.allclose(out[name], merged_weights[name], atol=1e-6), name
    tokens = data.tokens[:2, :37]
    with torch.no_grad():
        expected = merged(tokens).logits
    assert torch.allclose(llmdrop_rt.load(result.destination, dtype="float32").logits(tokens), expected, atol=1e-4)


def test_dropped_modules_stay_absent(dropped, healed_lm):
    result, _ = healed_lm
    plan = dropped["plan"]
    written = tensors(result.destination)
    assert written and not any(is_dropped_tensor(name, plan) for name in written)
    config = json.loads((result.destination / "config.json").read_text())
    assert (config["drop_attn_list"], config["drop_mlp_list"]) == (DROP_ATTN, DROP_MLP)
    model = load_transformers_model(dropped["reference"])  # the model trained, from the folder with every weight
    for layer_index, layer in enumerate(model.model.layers):
        for unit, standin, dropped_layers in (("self_attn", ZeroAttention, DROP_ATTN), ("mlp", ZeroMLP, DROP_MLP)):
            module = getattr(layer, unit)
            assert isinstance(module, standin) == (layer_index in dropped_layers)
            if layer_index in dropped_layers:
                assert not list(module.parameters())
    assert not any(f"layers.{i}.self_attn" in name for name in result.adapters for i in DROP_ATTN)
    assert not any(f"layers.{i}.mlp" in name for name in result.adapters for i in DROP_MLP)


def test_the_same_seed_gives_the_same_weights(dropped, healed_lm):
    result, data = healed_lm
    again = heal_model(dropped["strip"], dropped["root"] / "again", data, SETTINGS, progress=False)
    other = heal_model(dropped["strip"], dropped["root"] / "other-seed", data,
                       HealSettings(**{**SETTINGS.__dict__, "seed": 4}), progress=False)
    first, second, third = tensors(result.destination), tensors(again.destination), tensors(other.destination)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], third[name]) for name in first)


def test_cli_reports_perplexity_and_a_plain_checkpoint_stays_plain(tiny_checkpoints, tmp_path, capsys):
    """A checkpoint without drop lists (a renumbered export, say) is healed into a plain one; --report has the
    held-out perplexity before and after, the latter that of the written folder."""
    source = tiny_checkpoints["llama2"]  # q/k/v/o and MLP biases: LoRA adapts the weights, the biases stay
    out, report = tmp_path / "healed", tmp_path / "report.json"
    main(["heal", "--model", str(source), "--data", str(DATA / "calib.txt"), "--n-samples", "4", "--seq-len", "32",
          "--steps", "3", "--batch-size", "2", "--rank", "2", "--eval", str(DATA / "eval.txt"),
          "--max-eval-tokens", "300", "--eval-seq-len", "100", "--out", str(out), "--report", str(report),
          "--no-progress"])
    assert "perplexity on" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["output_format"] == "renumbered" and len(data["losses"]) == 3
    config = json.loads((out / "config.json").read_text())
    assert "drop_attn_list" not in config and config["num_hidden_layers"] == 4
    assert set(tensors(out)) == set(tensors(source))
    llm = llmdrop_rt.load(out)
    tokens = llm.tokenizer.encode((DATA / "eval.txt").read_text())[:300]
    from llmdrop_rt.drop.perplexity import evaluate_perplexity

    after = evaluate_perplexity(llm.model, tokens, 100, progress=False).perplexity
    assert data["eval_after"]["perplexity"] == pytest.approx(after, rel=1e-6)
    assert data["eval_before"]["perplexity"] != pytest.approx(after, rel=1e-3)


@pytest.mark.parametrize("args, named", [
    (["--rank", "0"], "--rank"),
    (["--lr", "-1e-3"], "--lr"),
    (["--steps", "x"], "--steps"),
    (["--objective", "dpo"], "--objective"),
    (["--objective", "distill"], "--teacher"),  # a strip export lacks the dropped weights
    (["--teacher", "SOURCE"], "--teacher"),  # with the lm objective
    (["--seq-len", "1000"], "seq_len"),  # beyond the model's context of 256
])
def test_bad_arguments_are_one_line_errors_naming_them(dropped, tmp_path, capsys, args, named):
    args = [str(dropped["source"]) if a == "SOURCE" else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["heal", "--model", str(dropped["strip"]), "--data", str(DATA / "calib.txt"), "--n-samples", "2",
              "--seq-len", "32", "--out", str(tmp_path / "out"), "--no-progress", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_api_refusals(dropped, tmp_path):
    data = training_data(dropped["strip"])
    with pytest.raises(HealError, match="batch_size must be a positive integer"):
        heal_model(dropped["strip"], tmp_path / "x", data, HealSettings(batch_size=0))
    with pytest.raises(ValueError, match="must not be the source"):
        heal_model(dropped["strip"], dropped["strip"], data, SETTINGS)
    with pytest.raises(HealError, match="teacher .*vocab_size"):
        other = tmp_path / "other-vocab"
        other.mkdir()
        config = json.loads((dropped["source"] / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**config, "vocab_size": 301}))
        heal_model(dropped["strip"], tmp_path / "y", data, HealSettings(objective="distill"), teacher=other)


def test_a_decilm_export_stays_decilm(tmp_path):
    """DeciLM in, DeciLM out: the same block_configs, the kept tensors only, loadable by load()."""
    from helpers import make_checkpoint
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    source = make_checkpoint(tmp_path / "src", config, seed=5)
    plan = DropPlan.create(3, [1], [2])
    decilm = export_model(source, tmp_path / "decilm", plan, "decilm")
    data = training_data(decilm)
    result = heal_model(decilm, tmp_path / "healed", data, HealSettings(rank=2, steps=2, batch_size=2, lr=1e-2),
                        progress=False)
    assert result.output_format == "decilm"
    written, stored = json.loads((result.destination / "config.json").read_text()), \
        json.loads((decilm / "config.json").read_text())
    assert written["block_configs"] == stored["block_configs"]
    assert set(tensors(result.destination)) == set(tensors(decilm))
    assert lm_loss(result.destination, data.tokens) < lm_loss(decilm, data.tokens)


@pytest.mark.parametrize("name", ["qwen2", "gemma2"])
def test_other_families_are_refused_before_any_training(family_checkpoints, tmp_path, name):
    """heal builds transformers' Llama/Mistral: another family's weights must never be trained as a Llama."""
    folder = family_checkpoints[name]
    with pytest.raises(HealError, match=f"heal takes llama and mistral checkpoints .*not {name}"):
        heal_model(folder, tmp_path / "out", training_data(folder), SETTINGS)
    assert not (tmp_path / "out").exists()
