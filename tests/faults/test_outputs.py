"""No output is lost or destroyed: a killed export leaves nothing half-published and its staging is reclaimed, two
exports to one destination never both report success, --force replaces only our own outputs, no output may be an
input, an output that cannot be written fails before the work, and outputs follow the umask."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DATA

import llmdrop_rt
from llmdrop_rt.cli import main
from llmdrop_rt.config import DropPlan
from llmdrop_rt.io.export import export_model
from llmdrop_rt.io.gguf_export import export_gguf
from llmdrop_rt.io.publish import OUTPUT_MARKER, OutputError, sibling, staged_file, staged_folder

ROOT = Path(__file__).resolve().parents[2]
# Runs `python -m llmdrop_rt ARGS` with the export's tensor writing held at a rendezvous once the staging folder
# is written: "hang" waits to be killed, "pair" waits until two runs are there (so both publish after both wrote).
HELD_EXPORT = """
import os, sys, time
from pathlib import Path
import llmdrop_rt.io.export as export
mode, rendezvous = sys.argv[1], Path(sys.argv[2])
write_tensors = export._write_tensors
def held(*args, **kwargs):
    write_tensors(*args, **kwargs)
    (rendezvous / f"ready-{os.getpid()}").touch()
    deadline = time.time() + 60
    while time.time() < deadline and (mode == "hang" or len(list(rendezvous.glob("ready-*"))) < 2):
        time.sleep(0.02)
export._write_tensors = held
from llmdrop_rt.cli import main
main(sys.argv[3:])
"""


def held_export(mode: str, rendezvous: Path, source: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = ["export", "--model", str(source), "--drop-attn", "1", "--format", "strip", "--out", str(out)]
    return subprocess.Popen([sys.executable, "-c", HELD_EXPORT, mode, str(rendezvous), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def wait_for(condition, seconds=60):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_a_killed_export_publishes_nothing_and_its_staging_is_reclaimed(tiny_checkpoints, tmp_path):
    source, out, rendezvous = tiny_checkpoints["llama2"], tmp_path / "out" / "model", tmp_path / "sync"
    rendezvous.mkdir()
    run = held_export("hang", rendezvous, source, out)
    wait_for(lambda: list(rendezvous.glob("ready-*")))
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not out.exists()
    (staging,) = hidden(out.parent)  # the killed run's half-written folder, named after its pid
    assert staging.startswith(f".model.{run.pid}-") and any((out.parent / staging).iterdir())

    main(["export", "--model", str(source), "--drop-attn", "1", "--format", "strip", "--out", str(out)])
    assert hidden(out.parent) == []  # reclaimed: its process is gone
    assert llmdrop_rt.load(out, device="cpu").plan == DropPlan.create(4, [1])


def test_two_exports_to_one_new_destination_one_succeeds_one_fails_clearly(tiny_checkpoints, tmp_path):
    source, out, rendezvous = tiny_checkpoints["llama2"], tmp_path / "model", tmp_path / "sync"
    rendezvous.mkdir()
    runs = [held_export("pair", rendezvous, source, out) for _ in range(2)]
    results = [(run.wait(timeout=120), *run.communicate()) for run in runs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    (_, failure_out, failure_err), = [r for r in results if r[0] == 2]
    assert failure_err.strip().splitlines() == [
        f"error: {out} appeared while this run was writing it (another run writing the same destination?); it "
        "was left as it is and this result discarded"]
    assert hidden(tmp_path) == []
    assert llmdrop_rt.load(out, device="cpu").plan == DropPlan.create(4, [1])
    assert json.loads((out / OUTPUT_MARKER).read_text())["command"] == "export"


def test_staging_of_live_runs_is_kept_and_of_dead_runs_removed(tmp_path):
    destination = tmp_path / "converted"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_staging = tmp_path / sibling(destination, "partial").name.replace(f".{os.getpid()}-",
                                                                           f".{dead.stdout.strip()}-")
    dead_staging.mkdir()
    (dead_staging / "model.safetensors").write_bytes(b"half")
    live_staging = sibling(destination, "partial")  # ours: this process is alive
    live_staging.mkdir()
    unrelated = tmp_path / ".converted.notes"
    unrelated.write_text("not staging")
    with staged_folder(destination) as staging:
        assert not dead_staging.exists() and live_staging.is_dir() and unrelated.is_file()
        assert staging.parent == tmp_path


def test_force_replaces_only_our_own_outputs(tiny_checkpoints, tmp_path, capsys):
    source = tiny_checkpoints["llama2"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "weights.safetensors").write_bytes(b"someone's checkpoint")
    argv = ["export", "--model", str(source), "--drop-attn", "1", "--format", "strip", "--force", "--out"]
    with pytest.raises(SystemExit) as refused:
        main([*argv, str(theirs)])
    assert refused.value.code == 2
    assert capsys.readouterr().err == (f"error: refusing to replace {theirs}: it is not a folder written by "
                                       f"llmdrop-rt (no {OUTPUT_MARKER}); remove it yourself or choose another "
                                       "destination\n")
    assert (theirs / "weights.safetensors").read_bytes() == b"someone's checkpoint"

    ours = export_model(source, tmp_path / "ours", DropPlan.create(4, [2]), "strip")
    main([*argv, str(ours)])
    assert llmdrop_rt.load(ours, device="cpu").plan == DropPlan.create(4, [1])

    gguf_file = tmp_path / "notes.gguf"
    gguf_file.write_text("not a GGUF file")
    with pytest.raises(OutputError, match="not a file of the kind this writes"):
        export_gguf(source, gguf_file, DropPlan.create(4), overwrite=True)
    assert gguf_file.read_text() == "not a GGUF file"


@pytest.mark.parametrize("command", ["score", "sweep", "drop"])
def test_an_output_that_is_an_input_is_refused(tiny_checkpoints, tmp_path, capsys, command):
    calib = tmp_path / "calib.txt"
    calib.write_text((DATA / "calib.txt").read_text()[:4000])
    before = calib.read_bytes()
    model = tiny_checkpoints["llama2"]
    extra = {"score": [], "sweep": ["--eval", str(calib)], "drop": ["-k", "1"]}[command]
    with pytest.raises(SystemExit) as refused:
        main([command, "--model", str(model), "--calib", str(calib), *extra, "--out", str(calib)])
    assert refused.value.code == 2
    assert capsys.readouterr().err == (f"error: --out {calib} is the input --calib {calib}; refusing to write "
                                       "there\n")
    assert calib.read_bytes() == before
    with pytest.raises(SystemExit):
        main([command, "--model", str(model), "--calib", str(calib), *extra, "--out", str(model / "config.json")])
    assert f"is inside the input --model {model}" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(tiny_checkpoints, tmp_path, umask):
    previous = os.umask(umask)
    try:
        folder = export_model(tiny_checkpoints["llama2"], tmp_path / "folder", DropPlan.create(4, [1]), "strip")
        gguf_file = tmp_path / "model.gguf"
        with staged_file(gguf_file) as partial:  # how export_gguf writes its file
            partial.write_bytes(b"GGUF")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    for path in [*folder.iterdir(), gguf_file]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
