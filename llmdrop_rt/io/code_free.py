"""A model folder as a third-party library (GPTQModel, transformers) may see it: data only, nothing to execute.

transformers and the libraries built on it resolve `auto_map` entries in config.json and tokenizer_config.json to
Python files of the folder (GPTQModel does so even with trust_remote_code off), and read `*.bin` / `*.pt` weights
with pickle. We never hand them the folder itself: `code_free_view` builds a private temporary folder holding links
to the folder's safetensors and tokenizer files and copies of its JSON files with every remote-code reference
removed -- no Python file, no pickle, no subfolder. The models we hand over are Llama / Mistral checkpoints that
transformers builds from its own code (`ModelConfig` refuses any other architecture), so the view loads the same
model without running a line that came with the checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ..config import read_json

# Files a library may read besides the safetensors weights; none of them is executable.
DATA_FILES = ("tokenizer.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.jinja", "model.safetensors.index.json", "quantize_config.json")
# JSON files whose remote-code fields are removed in the view.
CODE_REFERENCING_FILES = ("config.json", "tokenizer_config.json", "generation_config.json")
# Fields naming code for transformers to import (from the folder or the hub).
REMOTE_CODE_FIELDS = ("auto_map", "custom_pipelines")


@contextlib.contextmanager
def code_free_view(folder: str | Path) -> Iterator[Path]:
    """A temporary folder showing `folder`'s weights, tokenizer and config to a library, without anything it
    could execute (see the module doc). Removed when the block ends; the weights are linked, not copied."""
    folder = Path(folder).resolve()
    with tempfile.TemporaryDirectory(prefix="llmdrop_rt-view-") as scratch:
        view = Path(scratch) / folder.name
        view.mkdir()
        for entry in folder.iterdir():
            if not entry.is_file():
                continue
            if entry.name in CODE_REFERENCING_FILES:
                (view / entry.name).write_text(_without_remote_code(entry), encoding="utf-8")
            elif entry.suffix == ".safetensors" or entry.name in DATA_FILES:
                os.symlink(entry, view / entry.name)
        yield view


def _without_remote_code(path: Path) -> str:
    data = {key: value for key, value in read_json(path).items() if key not in REMOTE_CODE_FIELDS}
    return json.dumps(data, indent=2)
