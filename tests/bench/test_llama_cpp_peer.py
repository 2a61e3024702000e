"""The llama.cpp rows are planned at the precision of ours: same weights type, same KV cache type (llama-bench has no
f32 cache: an fp32 cache of ours meets its f16 default)."""
import stat

import pytest

from llmdrop_rt.bench import llama_cpp
from llmdrop_rt.bench.cli import build_parser
from llmdrop_rt.config import ModelConfig


@pytest.fixture
def fake_llama_bench(tmp_path, monkeypatch):
    """A llama-bench that prints its own arguments as its JSON record."""
    tool = tmp_path / "llama-bench"
    tool.write_text('#!/bin/sh\nprintf \'[{"argv": "%s"}]\' "$*"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv(llama_cpp.ENV_VAR, str(tmp_path))
    return tool


@pytest.mark.parametrize("kv_cache, kv_type", [("auto", "f16"), ("fp32", "f16"), ("fp16", "f16"), ("bf16", "bf16")])
def test_peer_rows_cache_kv_in_our_rows_type(fake_llama_bench, tiny_checkpoints, kv_cache, kv_type):
    args = build_parser().parse_args(["--kv-cache", kv_cache, "--weights", "int8,bf16,int4", "--drop", "0",
                                      "--model", str(tiny_checkpoints["llama3"])])
    args.thread_counts, args.dtype = [1, 2], "float32"  # as the bench's main() resolves them
    jobs = llama_cpp.plan_peer_jobs(args, ModelConfig.from_folder(args.model))
    # bf16 has no llama.cpp row; every other format at both thread counts.
    assert [(j["gguf_type"], j["threads"]) for j in jobs] == [("q8_0", 1), ("q4_0", 1), ("q8_0", 2), ("q4_0", 2)]
    assert {j["kv_type"] for j in jobs} == {kv_type}
    [record] = llama_cpp.run_llama_bench("m.gguf", threads=(1, 2), kv_type=jobs[0]["kv_type"])
    assert f"-ctk {kv_type} -ctv {kv_type}" in record["argv"] and "-t 1,2" in record["argv"]


def test_llama_bench_keeps_its_default_cache_unless_told(fake_llama_bench):
    [record] = llama_cpp.run_llama_bench("m.gguf")
    assert "-ctk f16 -ctv f16" in record["argv"]
