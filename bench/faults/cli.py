"""Command-line fault cases: bad arguments to every command, bad paths, outputs under files or over inputs,
existing destinations, bad drop lists and sampling values, devices, calibration and scores files, and model
folders carrying code (a canary module that writes a file when imported).

`cases(workdir)` writes what the cases need under `workdir` (a tiny Llama checkpoint made with torch and
tokenizers only, texts, files in the way) and returns the cases; each uses its own output paths, so they run in
any order.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from faults.case import Case
from safetensors.torch import save_file

from llmdrop_rt.config import DropPlan
from llmdrop_rt.io.export import export_model

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 300, 64, 128, 4, 4, 2
CANARY = "canary_code"
MODEL_COMMANDS = ("generate", "ppl", "score", "drop", "sweep", "export", "quantize", "eval")


def write_tokenizer(folder: Path) -> None:
    """Byte-level BPE (every byte a token, three merges) plus <s>, </s>, padded to VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]  # a few, so that the GGUF export has merges to write
    for first, second in merges:
        vocab[first + second] = len(vocab)
    while len(vocab) < VOCAB:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}"}))


def write_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama checkpoint (GQA, tied embeddings), weights of realistic scale."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    head_dim = HIDDEN // HEADS

    def matrix(rows, cols):
        return torch.randn(rows, cols, generator=generator) / math.sqrt(cols)

    def norm():
        return 1.0 + 0.1 * torch.randn(HIDDEN, generator=generator)

    tensors = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=generator),
               "model.norm.weight": norm()}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}."
        tensors.update({
            prefix + "self_attn.q_proj.weight": matrix(HEADS * head_dim, HIDDEN),
            prefix + "self_attn.k_proj.weight": matrix(KV_HEADS * head_dim, HIDDEN),
            prefix + "self_attn.v_proj.weight": matrix(KV_HEADS * head_dim, HIDDEN),
            prefix + "self_attn.o_proj.weight": matrix(HIDDEN, HEADS * head_dim),
            prefix + "mlp.gate_proj.weight": matrix(FFN, HIDDEN),
            prefix + "mlp.up_proj.weight": matrix(FFN, HIDDEN),
            prefix + "mlp.down_proj.weight": matrix(HIDDEN, FFN),
            prefix + "input_layernorm.weight": norm(),
            prefix + "post_attention_layernorm.weight": norm(),
        })
    save_file(tensors, str(folder / "model.safetensors"), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 1,
        "hidden_act": "silu", "torch_dtype": "float32"}))
    write_tokenizer(folder)
    return folder


def write_canary_model(folder: Path, fired: Path) -> Path:
    """The tiny model with auto_map entries (config and tokenizer config) pointing at a module that writes
    `fired` when imported."""
    shutil.copytree(MODEL, folder)
    (folder / f"{CANARY}.py").write_text(
        f"from pathlib import Path\nPath({str(fired)!r}).write_text('imported')\n"
        "from transformers import LlamaConfig as C, LlamaForCausalLM as M, PreTrainedTokenizerFast as T\n")
    for name, auto_map in (("config.json", {"AutoConfig": f"{CANARY}.C", "AutoModelForCausalLM": f"{CANARY}.M"}),
                           ("tokenizer_config.json", {"AutoTokenizer": [None, f"{CANARY}.T"]})):
        data = json.loads((folder / name).read_text())
        data["auto_map"] = auto_map
        (folder / name).write_text(json.dumps(data))
    return folder


MODEL: Path  # set by cases()


def cases(workdir: Path) -> list[Case]:
    global MODEL
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    MODEL = write_model(workdir / "model")
    text = workdir / "text.txt"
    text.write_text(" ".join(f"word{i % 41} and some more text number {i}." for i in range(600)))
    a_file = workdir / "a_file.txt"
    a_file.write_text("a file in the way\n")
    a_folder = workdir / "a_folder"
    a_folder.mkdir()
    foreign = workdir / "foreign"  # somebody's folder: never replaced
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"not ours")
    out = workdir / "out"
    out.mkdir()
    model = ["--model", str(MODEL)]
    calib = ["--calib", str(text), "--n-samples", "2", "--seq-len", "16", "--no-progress"]
    found = []

    def add(name, argv, expect="error", mentions=(), check=None):
        found.append(Case(name, [str(a) for a in argv], expect, tuple(mentions), check))

    def base(command, tag):
        """A runnable command line for `command` with outputs under out/<tag>."""
        where = out / tag
        return {
            "generate": ["generate", *model, "--prompt", "hello", "--max-new-tokens", "3"],
            "ppl": ["ppl", *model, "--text", text, "--seq-len", "32", "--max-tokens", "96", "--no-progress"],
            "score": ["score", *model, *calib, "--out", f"{where}.json"],
            "drop": ["drop", *model, *calib, "-k", "1"],
            "sweep": ["sweep", *model, *calib, "--eval", text, "--ks", "1", "--methods", "cosine:attn",
                      "--max-eval-tokens", "96", "--eval-seq-len", "32", "--out", f"{where}.json"],
            "export": ["export", *model, "--drop-attn", "1", "--format", "strip", "--out", where],
            "quantize": ["quantize", *model, "--calib", text, "--n-samples", "2", "--seq-len", "16",
                         "--group-size", "64", "--out", where],
            "eval": ["eval", *model, "--tasks", "llmdrop_mc", "--limit", "2", "--offline", "--out", f"{where}.json"],
        }[command]

    # --- drop lists, for every command that takes them ---------------------------------------------------------
    bad_lists = [("reversed", "3-1", "3-1"), ("huge", "0-99999999999", "99999999999"), ("twice", "1,1", "twice"),
                 ("overlap", "0-2,2", "twice"), ("negative", "-1", "negative"), ("word", "one", "one"),
                 ("open-range", "1-", "1-"), ("float", "1.5", "1.5"), ("out-of-range", "7", "7"),
                 ("just-beyond", "4", "4")]
    for command in MODEL_COMMANDS:
        for flag in ("--drop-attn", "--drop-mlp"):
            for tag, value, mention in bad_lists:
                if flag == "--drop-mlp" and tag not in ("reversed", "huge", "out-of-range"):
                    continue
                add(f"{command}-{flag[2:]}-{tag}", [*base(command, f"{command}-{flag}-{tag}"), flag, value],
                    mentions=(mention,))
    for command in ("generate", "export", "score"):
        add(f"{command}-drop-everything", [*base(command, f"{command}-all"), "--drop-attn", "0-3", "--drop-mlp", "0-3"],
            mentions=("every one of the 4 layers",))

    # --- sampling ---------------------------------------------------------------------------------------------
    generate = base("generate", "")
    for flag, value, mention in [
        ("--temperature", "-1", "temperature"), ("--temperature", "nan", "temperature"),
        ("--temperature", "inf", "temperature"), ("--temperature", "warm", "--temperature"),
        ("--top-p", "2", "top_p"), ("--top-p", "0", "top_p"), ("--top-p", "-0.5", "top_p"),
        ("--top-k", "-1", "top_k"), ("--top-k", "1.5", "--top-k"), ("--max-new-tokens", "0", "max_new_tokens"),
        ("--max-new-tokens", "-1", "max_new_tokens"), ("--max-new-tokens", "1.5", "--max-new-tokens"),
        ("--max-new-tokens", "100000", "max_new_tokens"), ("--seed", "-1", "seed"),
        ("--seed", str(2**64), "seed"), ("--seed", "x", "--seed"), ("--stop", "", "stop"),
    ]:
        add(f"generate-{flag[2:]}-{value or 'empty'}", [*generate, flag, value], mentions=(mention,))
    add("generate-no-prompt", ["generate", *model], mentions=("--prompt",))
    add("generate-weights-bogus", [*generate, "--weights", "int3"], mentions=("--weights",))

    # --- devices and dtypes -----------------------------------------------------------------------------------
    for command in ("generate", "ppl", "score", "eval"):
        argv = base(command, f"{command}-device")
        for device, mention in (("cuda", "cuda"), ("bogus", "bogus"), ("cuda:99", "cuda:99"), ("tpu", "tpu"),
                                ("xpu", "xpu")):
            if device == "cuda" and torch.cuda.is_available():
                continue
            add(f"{command}-device-{device}", [*argv, "--device", device], mentions=(mention,))
        add(f"{command}-dtype-bogus", [*argv, "--dtype", "float12"], mentions=("float12",))

    # --- model folders ----------------------------------------------------------------------------------------
    empty = workdir / "empty-model"
    empty.mkdir()
    list_config = workdir / "list-config"
    list_config.mkdir()
    (list_config / "config.json").write_text("[1, 2]")
    bad_json = workdir / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    generation_list = workdir / "generation-list"
    shutil.copytree(MODEL, generation_list)
    (generation_list / "generation_config.json").write_text("[]")
    for command in MODEL_COMMANDS:
        argv = base(command, f"{command}-model")
        at = argv.index("--model") + 1
        for tag, folder, mention in (("missing", workdir / "absent", "absent"), ("empty", empty, "config.json"),
                                     ("a-file", a_file, "a_file.txt"), ("list-config", list_config, "config.json"),
                                     ("bad-json", bad_json, "config.json")):
            add(f"{command}-model-{tag}", [*argv[:at], folder, *argv[at + 1:]], mentions=(mention,))
    for command in ("generate", "ppl", "eval"):
        argv = base(command, f"{command}-gen-list")
        at = argv.index("--model") + 1
        add(f"{command}-generation-config-list", [*argv[:at], generation_list, *argv[at + 1:]],
            mentions=("generation_config.json",))

    # --- outputs: under a file, a folder where a file belongs, an input ----------------------------------------
    under = a_file / "x"
    for command, flag in (("score", "--out"), ("score", "--plot"), ("ppl", "--out"), ("eval", "--out"),
                          ("sweep", "--out"), ("drop", "--out"), ("drop", "--export"), ("export", "--out"),
                          ("quantize", "--out"), ("sweep", "--plot")):
        add(f"{command}-{flag[2:]}-under-a-file", [*base(command, f"{command}-under"), flag, under],
            mentions=("a_file.txt",))
    for command, flag in (("score", "--out"), ("ppl", "--out"), ("eval", "--out"), ("sweep", "--out"),
                          ("drop", "--out"), ("score", "--plot")):
        add(f"{command}-{flag[2:]}-is-a-folder", [*base(command, f"{command}-folder"), flag, out],
            mentions=(str(out),))
    for command, flag in (("score", "--out"), ("drop", "--out"), ("sweep", "--out"), ("ppl", "--out"),
                          ("score", "--plot")):
        add(f"{command}-{flag[2:]}-is-the-text", [*base(command, f"{command}-input"), flag, text],
            mentions=("text.txt", "--"))
    for command, flag in (("export", "--out"), ("quantize", "--out"), ("drop", "--export")):
        add(f"{command}-{flag[2:]}-is-the-model", [*base(command, f"{command}-model-out"), flag, MODEL],
            mentions=(str(MODEL),))
        add(f"{command}-{flag[2:]}-inside-the-model", [*base(command, f"{command}-inside"), flag, MODEL / "sub"],
            mentions=(str(MODEL),))
    for command in ("score", "ppl", "eval"):
        add(f"{command}-out-is-a-model-file", [*base(command, f"{command}-model-file"), "--out", MODEL / "config.json"],
            mentions=("config.json",))

    # --- existing destinations --------------------------------------------------------------------------------
    for command, flag in (("export", "--out"), ("quantize", "--out"), ("drop", "--export")):
        argv = base(command, f"{command}-existing")
        add(f"{command}-{flag[2:]}-exists", [*argv, flag, foreign], mentions=(str(foreign), "exists"))
        add(f"{command}-{flag[2:]}-force-foreign", [*argv, flag, foreign, "--force"],
            mentions=(str(foreign), "not a folder written by llmdrop-rt"))
        add(f"{command}-{flag[2:]}-over-a-file", [*argv, flag, a_file, "--force"], mentions=("a_file.txt",))
    not_gguf = workdir / "not-a-model.gguf"
    not_gguf.write_text("text, not GGUF")
    export_gguf = [*base("export", "gguf-x"), "--format", "gguf"]
    add("export-gguf-exists", [*export_gguf, "--out", not_gguf], mentions=("not-a-model.gguf", "exists"))
    add("export-gguf-force-foreign", [*export_gguf, "--out", not_gguf, "--force"], mentions=("not-a-model.gguf",))
    add("export-gguf-is-a-folder", [*export_gguf, "--out", out], mentions=(str(out),))

    # --- formats and options ----------------------------------------------------------------------------------
    export = base("export", "formats")
    add("export-format-zip", [*export, "--format", "zip"], mentions=("--format",))
    add("export-gguf-type-q4_1", [*export, "--format", "gguf", "--gguf-type", "q4_1"], mentions=("--gguf-type",))
    add("export-renumbered-not-block", [*export, "--format", "renumbered"], mentions=("renumbered",))
    add("export-decilm-layer0", [*base("export", "decilm0"), "--format", "decilm", "--drop-attn", "0"],
        mentions=("layer 0",))
    add("export-no-out", ["export", *model], mentions=("--out",))

    # --- calibration, texts, scores files ---------------------------------------------------------------------
    empty_text = workdir / "empty.txt"
    empty_text.write_text("")
    jsonl = workdir / "texts.jsonl"
    jsonl.write_text(json.dumps({"body": "no text field here"}) + "\n")
    garbage_jsonl = workdir / "garbage.jsonl"
    garbage_jsonl.write_text("{not json\n")
    for command in ("score", "drop", "sweep", "quantize"):
        argv = base(command, f"{command}-calib")
        at = argv.index("--calib") + 1
        for tag, value, mention in (("missing", workdir / "absent.txt", "absent.txt"),
                                    ("empty", empty_text, "empty.txt"), ("jsonl-field", jsonl, "text"),
                                    ("jsonl-garbage", garbage_jsonl, "garbage.jsonl"),
                                    ("folder", a_folder, "a_folder is a folder")):
            add(f"{command}-calib-{tag}", [*argv[:at], value, *argv[at + 1:]], mentions=(mention,))
        add(f"{command}-n-samples-0", [*argv, "--n-samples", "0"], mentions=("--n-samples",))
        add(f"{command}-seq-len-negative", [*argv, "--seq-len", "-4"], mentions=("--seq-len",))
    for tag, value, mention in (("missing", workdir / "absent.txt", "absent.txt"), ("empty", empty_text, "empty.txt"),
                                ("folder", a_folder, "a_folder is a folder")):
        add(f"ppl-text-{tag}", ["ppl", *model, "--text", value], mentions=(mention,))
    ppl = base("ppl", "opts")
    for flag in ("--seq-len", "--stride", "--batch-size", "--max-tokens"):
        add(f"ppl{flag}-0", [*ppl, flag, "0"], mentions=(flag,))
    scores_list = workdir / "scores-list.json"
    scores_list.write_text("[]")
    scores_other = workdir / "scores-other.json"
    scores_other.write_text(json.dumps({"format": "something else"}))
    scores_bad = workdir / "scores-bad.json"
    scores_bad.write_text("{")
    drop = ["drop", *model, "-k", "1"]
    for tag, value, mention in (("missing", workdir / "absent.json", "absent.json"),
                                ("list", scores_list, "scores-list.json"), ("other", scores_other, "scores-other.json"),
                                ("bad-json", scores_bad, "scores-bad.json")):
        add(f"drop-scores-{tag}", [*drop, "--scores", value], mentions=(mention,))
    add("drop-scores-iterative", [*drop, "--scores", scores_other, "--mode", "iterative"], mentions=("--scores",))
    add("drop-neither-calib-nor-scores", drop, mentions=("--calib",))
    add("drop-k-0", ["drop", *model, *calib, "-k", "0"], mentions=("--num-drop",))
    add("drop-k-too-many", ["drop", *model, *calib, "-k", "99"], mentions=("99",))
    sweep = base("sweep", "opts")
    add("sweep-methods-bogus", [*sweep, "--methods", "bogus:attn"], mentions=("bogus",))
    add("sweep-ks-0", [*sweep, "--ks", "0"], mentions=("--ks",))
    add("sweep-ks-word", [*sweep, "--ks", "two"], mentions=("--ks",))
    add("sweep-eval-missing", [*sweep, "--eval", workdir / "absent.txt"], mentions=("absent.txt",))

    # --- eval and quantize options ----------------------------------------------------------------------------
    evaluate = base("eval", "opts")
    add("eval-task-unknown", [*evaluate, "--tasks", "no_such_task"], mentions=("no_such_task",))
    add("eval-limit-negative", [*evaluate, "--limit", "-1"], mentions=("--limit",))
    add("eval-fewshot-negative", [*evaluate, "--num-fewshot", "-1"], mentions=("--num-fewshot",))
    add("eval-batch-size-0", [*evaluate, "--batch-size", "0"], mentions=("--batch-size",))
    add("eval-max-length-0", [*evaluate, "--max-length", "0"], mentions=("--max-length",))
    quantize = base("quantize", "opts")
    add("quantize-group-size-12", [*quantize, "--group-size", "12"], mentions=("group_size=12",))
    add("quantize-group-size-0", [*quantize, "--group-size", "0"], mentions=("group_size=0",))
    add("quantize-awq-desc-act", [*quantize, "--method", "awq", "--desc-act"], mentions=("desc_act",))
    add("quantize-dtype-float32", [*quantize, "--dtype", "float32"], mentions=("--dtype",))
    add("quantize-method-int8", [*quantize, "--method", "int8"], mentions=("--method",))
    if not torch.cuda.is_available():
        add("quantize-device-cuda", [*quantize, "--device", "cuda"], mentions=("cuda",))
    add("quantize-device-bogus", [*quantize, "--device", "bogus"], mentions=("bogus",))

    # --- commands that work, including on a folder carrying code ----------------------------------------------
    fired = workdir / "CANARY_FIRED"
    canary = write_canary_model(workdir / "canary-model", fired)

    def quiet_canary(check):
        return lambda stdout: not fired.exists() and check(stdout)

    checks = {
        "generate": lambda stdout: stdout.endswith("\n"),
        "ppl": lambda stdout: stdout.startswith("perplexity "),
        "score": lambda stdout: stdout.startswith("scored 4 layers"),
        "drop": lambda stdout: stdout.startswith("drop attn by cosine"),
        "sweep": lambda stdout: stdout.startswith("baseline perplexity"),
        "export": lambda stdout: stdout.startswith("exported DropPlan(attn=[1]"),
        "quantize": lambda stdout: "gptq 4-bit g64 of" in stdout,  # GPTQModel prints to stdout too
        "eval": lambda stdout: "llmdrop_mc" in stdout,
    }
    for command in MODEL_COMMANDS:
        add(f"{command}-ok", base(command, f"{command}-ok"), "ok", check=checks[command])
        argv = base(command, f"{command}-canary")
        at = argv.index("--model") + 1
        add(f"{command}-canary-folder", [*argv[:at], canary, *argv[at + 1:]], "ok",
            check=quiet_canary(checks[command]))
    add("export-gguf-ok", [*base("export", "gguf-ok"), "--format", "gguf", "--drop-attn", "", "--out",
                           out / "model.gguf"], "ok", check=lambda stdout: (out / "model.gguf").is_file())
    ours = export_model(MODEL, out / "ours", DropPlan.create(LAYERS, [2]), "strip")  # an earlier output of ours
    add("export-force-ours", [*base("export", "")[:-1], ours, "--force"], "ok", check=checks["export"])
    add("generate-stop-string", [*generate, "--stop", "abc"], "ok", check=checks["generate"])
    return found
