"""No code shipped in a model folder runs, through any command: a folder whose config.json and
tokenizer_config.json point `auto_map` at a canary module (which writes a file when imported) goes through every
command that takes a model folder, and the canary file never appears."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import DATA, make_checkpoint

from llmdrop_rt.cli import main
from llmdrop_rt.io.code_free import code_free_view
from llmdrop_rt.quant.gptqmodel import import_gptqmodel

CANARY_MODULE = "canary_code"


@pytest.fixture(scope="module")
def canary_folder(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama (projections multiples of 64, as GPTQModel's kernels want) with code references everywhere
    transformers looks for them, and the file the canary would write."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("canary")
    folder = make_checkpoint(root / "model", LlamaConfig(
        vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=0,
        eos_token_id=1), seed=3)
    fired = root / "CANARY_FIRED"
    (folder / f"{CANARY_MODULE}.py").write_text(
        f"from pathlib import Path\nPath({str(fired)!r}).write_text('imported')\n"
        "from transformers import LlamaConfig as CanaryConfig, LlamaForCausalLM as CanaryModel\n"
        "from transformers import PreTrainedTokenizerFast as CanaryTokenizer\n")
    for name, auto_map in (("config.json", {"AutoConfig": f"{CANARY_MODULE}.CanaryConfig",
                                            "AutoModelForCausalLM": f"{CANARY_MODULE}.CanaryModel"}),
                           ("tokenizer_config.json", {"AutoTokenizer": [None, f"{CANARY_MODULE}.CanaryTokenizer"]})):
        data = json.loads((folder / name).read_text())
        data["auto_map"] = auto_map
        (folder / name).write_text(json.dumps(data))
    return folder, fired


def test_the_code_free_view_shows_data_only(canary_folder):
    folder, _ = canary_folder
    (folder / "pytorch_model.bin").write_bytes(b"a pickle would be here")
    try:
        with code_free_view(folder) as view:
            names = sorted(p.name for p in view.iterdir())
            assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                             "tokenizer_config.json"]
            for name in ("config.json", "tokenizer_config.json"):
                assert "auto_map" not in json.loads((view / name).read_text())
            assert (view / "model.safetensors").resolve() == (folder / "model.safetensors").resolve()
        assert not view.exists()
    finally:
        (folder / "pytorch_model.bin").unlink()


def commands(folder: Path, out: Path) -> dict[str, list[str]]:
    model, calib, text = ["--model", str(folder)], str(DATA / "calib.txt"), str(DATA / "eval.txt")
    small = ["--n-samples", "2", "--seq-len", "16", "--no-progress"]
    return {
        "generate": ["generate", *model, "--prompt", "hi", "--max-new-tokens", "2"],
        "ppl": ["ppl", *model, "--text", text, "--seq-len", "32", "--max-tokens", "64", "--no-progress"],
        "score": ["score", *model, "--calib", calib, *small, "--out", str(out / "scores.json")],
        "drop": ["drop", *model, "--calib", calib, *small, "-k", "1", "--export", str(out / "dropped")],
        "export": ["export", *model, "--drop-attn", "1", "--format", "strip", "--out", str(out / "exported")],
        "eval": ["eval", *model, "--tasks", "llmdrop_mc", "--limit", "2", "--offline",
                 "--out", str(out / "eval.json")],
        "quantize": ["quantize", *model, "--drop-attn", "1", "--calib", calib, "--n-samples", "2", "--seq-len", "16",
                     "--group-size", "64", "--out", str(out / "quantized")],
    }


@pytest.mark.parametrize("command", ["generate", "ppl", "score", "drop", "export", "eval", "quantize"])
def test_no_command_runs_code_from_the_model_folder(canary_folder, command, tmp_path, capsys):
    folder, fired = canary_folder
    argv = commands(folder, tmp_path)[command]
    if command == "eval":
        pytest.importorskip("lm_eval")
    if command == "quantize":
        pytest.importorskip("gptqmodel")
    main(argv)
    assert not fired.exists(), f"`{command}` imported {CANARY_MODULE}.py from the model folder"
    assert (folder / f"{CANARY_MODULE}.py").is_file()  # the folder itself is untouched
    if command == "quantize":
        assert not any(p.suffix == ".py" for p in (tmp_path / "quantized").iterdir())
        assert "auto_map" not in json.loads((tmp_path / "quantized" / "config.json").read_text())


def test_gptqmodel_on_the_folder_itself_would_run_the_canary(canary_folder, tmp_path):
    """The threat is real: handed the folder (not our view), GPTQModel imports the canary. Without this the test
    above could pass because nothing ever looks at auto_map."""
    pytest.importorskip("gptqmodel")
    gptqmodel = import_gptqmodel()
    folder, fired = canary_folder
    copy = shutil.copytree(folder, tmp_path / "copy")
    gptqmodel.GPTQModel.load(str(copy), gptqmodel.QuantizeConfig(bits=4, group_size=64), device="cpu")
    if not fired.exists():
        pytest.fail("GPTQModel did not import the canary from a folder with auto_map: the canary tests prove nothing")
    fired.unlink()
