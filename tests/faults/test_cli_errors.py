"""Every error of the command line is one line naming the file, field or argument, with a non-zero exit:
refusals exit 2, unexpected failures 1 as `internal error`; --debug or LLMDROP_RT_DEBUG=1 shows the traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DATA

from llmdrop_rt.cli import describe, main

ROOT = Path(__file__).resolve().parents[2]


def error_of(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return exit_info.value.code, err.strip()


@pytest.fixture
def model(tiny_checkpoints, tmp_path) -> Path:
    """A copy of a tiny checkpoint each test may break."""
    return Path(shutil.copytree(tiny_checkpoints["llama2"], tmp_path / "model"))


def test_outputs_that_cannot_be_written_fail_before_any_work(model, tmp_path, capsys, monkeypatch):
    import llmdrop_rt.cli.evaluate as evaluate

    monkeypatch.setattr(evaluate, "load_from_args", lambda args: pytest.fail("the evaluation started"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert error_of(["eval", "--model", str(model), "--tasks", "llmdrop_mc", "--out", str(a_file / "r.json")],
                    capsys) == (2, f"error: --out {a_file / 'r.json'}: {a_file} is a file, so nothing can be "
                                   "written under it")
    assert error_of(["eval", "--model", str(model), "--out", str(tmp_path)], capsys) == (
        2, f"error: --out {tmp_path} is a folder; give a file name")
    code, err = error_of(["score", "--model", str(model), "--calib", str(DATA / "calib.txt"),
                          "--out", str(tmp_path / "s.json"), "--plot", str(a_file / "p.png")], capsys)
    assert (code, err) == (2, f"error: --plot {a_file / 'p.png'}: {a_file} is a file, so nothing can be written "
                              "under it")
    assert a_file.read_text() == "mine"


@pytest.mark.parametrize("broken", ["config.json", "generation_config.json"])
def test_json_of_the_wrong_shape_names_the_file(model, capsys, broken):
    (model / broken).write_text(json.dumps([1, 2]))
    assert error_of(["generate", "--model", str(model), "--prompt", "x", "--max-new-tokens", "1"], capsys) == (
        2, f"error: {model / broken}: expected a JSON object, got a list")


def test_a_scores_file_of_the_wrong_shape_is_named(model, tmp_path, capsys):
    scores = tmp_path / "scores.json"
    for content, detail in (([1], "expected a JSON object, got a list"), ({"format": "x"}, "not an llmdrop-rt")):
        scores.write_text(json.dumps(content))
        code, err = error_of(["drop", "--model", str(model), "--scores", str(scores), "-k", "1"], capsys)
        assert code == 2 and detail in err and (str(scores) in err or "scores file" in err), err


@pytest.mark.parametrize("device, message", [
    ("cuda", "device 'cuda' asked for, but CUDA is not available here"),
    ("bogus", "device 'bogus' is not a torch device (e.g. cpu, cuda, cuda:1)"),
])
@pytest.mark.parametrize("command", ["generate", "score"])
def test_device_errors_name_the_device(model, capsys, device, message, command):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = {"generate": ["--prompt", "x"], "score": ["--calib", str(DATA / "calib.txt"), "--out", "/tmp/x.json"]}
    assert error_of([command, "--model", str(model), "--device", device, *args[command]], capsys) == (
        2, f"error: {message}")


def test_a_missing_model_folder_is_named(tmp_path, capsys):
    assert error_of(["generate", "--model", str(tmp_path / "absent"), "--prompt", "x"], capsys) == (
        2, f"error: {tmp_path / 'absent' / 'config.json'}: file not found")


def test_filesystem_errors_read_as_path_and_reason():
    assert describe(PermissionError(13, "Permission denied", "/data/out.json")) == "/data/out.json: Permission denied"
    assert describe(IsADirectoryError(21, "Is a directory", "/a", None)) == "/a: Is a directory"
    assert describe(OSError(18, "Invalid cross-device link", "/a", None, "/b")) == "/a -> /b: Invalid cross-device link"
    assert describe(KeyError("model.norm.weight: missing from the checkpoint")) == (
        "model.norm.weight: missing from the checkpoint")
    assert describe(ValueError("first line\n  second line\n")) == "first line; second line"


def test_unexpected_errors_are_internal_errors_and_debug_shows_the_traceback(model, capsys, monkeypatch):
    import llmdrop_rt.cli.generate as generate

    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(generate, "load_from_args", broken)
    argv = ["generate", "--model", str(model), "--prompt", "x"]
    assert error_of(argv, capsys) == (
        1, "error: internal error: RuntimeError: boom (run with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", *argv])
    monkeypatch.setenv("LLMDROP_RT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)
    monkeypatch.setenv("LLMDROP_RT_DEBUG", "0")
    assert error_of(argv, capsys)[0] == 1


def test_the_command_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("LLMDROP_RT_DEBUG", None)
    run = subprocess.run([sys.executable, "-m", "llmdrop_rt", "ppl", "--model", str(tmp_path), "--text", "x.txt"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert (run.returncode, run.stderr) == (2, f"error: {tmp_path / 'config.json'}: file not found\n")
