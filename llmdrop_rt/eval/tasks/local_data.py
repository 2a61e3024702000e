"""Loaders for the local tasks' data, named by the task YAMLs (`custom_dataset: !function local_data.<name>`).

lm-eval resolves a YAML's `dataset_kwargs.data_files` against the current directory, not the YAML's, so the
tasks load their JSONL files here, relative to this file: they run from any working directory, offline.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _jsonl_test_split(filename: str):
    import datasets

    path = HERE / filename
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no records")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**_metadata):
    """llmdrop_mc: {question, choices, label} records."""
    return _jsonl_test_split("llmdrop_mc.jsonl")


def tempest(**_metadata):
    """llmdrop_tempest: {text} records for rolling perplexity."""
    return _jsonl_test_split("llmdrop_tempest.jsonl")
