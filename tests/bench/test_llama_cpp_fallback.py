"""A llama.cpp tool that crashes in its repacked layouts is run again without them, and says so."""
import stat

import pytest

from llmdrop_rt.bench import llama_cpp


def fake_tool(tmp_path, script: str):
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return str(tool)


def test_a_run_that_crashes_is_repeated_with_plain_layouts(tmp_path):
    tool = fake_tool(tmp_path, 'case "$*" in *--no-repack*) echo plain;; *) echo "AMX fault" >&2; exit 139;; esac\n')
    assert llama_cpp.run_with_plain_layouts_fallback([tool, "-m", "x"], ["--no-repack"], 10) == ("plain\n", False)


def test_a_run_that_works_keeps_its_repacked_layouts(tmp_path):
    tool = fake_tool(tmp_path, "echo repacked\n")
    assert llama_cpp.run_with_plain_layouts_fallback([tool], ["--no-repack"], 10) == ("repacked\n", True)


def test_both_failures_are_named(tmp_path):
    tool = fake_tool(tmp_path, 'echo "it broke: $*" >&2; exit 3\n')
    expected = r"tool exited with 3: it broke:; with --repack 0: tool exited with 3: it broke: --repack 0"
    with pytest.raises(RuntimeError, match=expected):
        llama_cpp.run_with_plain_layouts_fallback([tool], ["--repack", "0"], 10)
