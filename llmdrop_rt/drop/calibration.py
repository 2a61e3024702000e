"""Calibration data for scoring: texts from local files or a Hugging Face dataset, cut into fixed-length samples.

LLM-Drop's recipe: tokenize the texts, join them with EOS, cut the stream into `seq_len`-token sequences and take
`n_samples` of them (defaults 256 x 2048). We take the first `n_samples` sequences in order when `seed` is None
(LLM-Drop, no shuffling) and a seeded random choice of sequences otherwise; either way the result is deterministic.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEFAULT_N_SAMPLES = 256
DEFAULT_SEQ_LEN = 2048
MAX_N_SAMPLES = 1 << 20


class CalibrationError(ValueError):
    """Calibration input that cannot give the requested samples (missing file, too little text, bad settings)."""


def read_texts(source: str | Path, split: str = "validation", text_field: str = "text",
               dataset_config: str | None = None, max_texts: int | None = None) -> list[str]:
    """Texts from a .txt file (the whole file is one text), a .jsonl file (one JSON object per line with a
    `text_field` string), a .parquet file (a `text_field` column), or, when `source` is not an existing path, a
    Hugging Face dataset name read through `datasets` (optional; needs access to the hub).
    """
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            texts = [path.read_text(encoding="utf-8")]
        elif suffix == ".jsonl":
            texts = _read_jsonl(path, text_field)
        elif suffix == ".parquet":
            texts = _read_parquet(path, text_field)
        else:
            raise CalibrationError(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl or .parquet")
        source_name = str(path)
    elif path.is_dir():
        raise CalibrationError(f"{path} is a folder; give a .txt, .jsonl or .parquet file or a dataset name")
    elif path.suffix.lower() in (".txt", ".jsonl", ".parquet") or (path.parent != Path(".") and path.parent.is_dir()):
        raise CalibrationError(f"{path}: file not found")  # a local path, not a dataset name like 'allenai/c4'
    else:
        texts = _read_dataset(str(source), split, text_field, dataset_config, max_texts)
        source_name = f"dataset {source}"
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise CalibrationError(f"{source_name}: no non-empty text found")
    return texts[:max_texts] if max_texts else texts


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}:{number}: not valid JSON ({e})") from None
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise CalibrationError(f"{path}:{number}: no string field {text_field!r}")
        texts.append(value)
    return texts


def _read_parquet(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CalibrationError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise CalibrationError(f"{path}: no column {text_field!r} (columns: {table.column_names})")
    return [t for t in table.column(text_field).to_pylist() if isinstance(t, str)]


def _read_dataset(name: str, split: str, text_field: str, config: str | None, max_texts: int | None) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CalibrationError(
            f"{name!r} is not a local file, and reading it as a Hugging Face dataset needs the `datasets` package "
            "(pip install datasets); or pass a local .txt/.jsonl/.parquet file") from None
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, bad split: the library raises many types
        raise CalibrationError(f"dataset {name!r} (config {config!r}, split {split!r}) could not be loaded: "
                               f"{e}") from None
    if text_field not in data.column_names:
        raise CalibrationError(f"dataset {name!r}: no column {text_field!r} (columns: {data.column_names})")
    if max_texts:
        data = data.select(range(min(max_texts, len(data))))
    return list(data[text_field])


@dataclass(frozen=True)
class CalibrationSettings:
    source: str
    n_samples: int = DEFAULT_N_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int | None = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CalibrationSet:
    """`tokens` [n_samples, seq_len]; `valid` marks real tokens (False = padding, excluded from every average)."""

    tokens: torch.Tensor
    valid: torch.Tensor
    settings: CalibrationSettings

    @property
    def n_samples(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]


def check_sizes(n_samples: int, seq_len: int, max_seq_len: int | None = None):
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or not 1 <= n_samples <= MAX_N_SAMPLES:
        raise CalibrationError(f"n_samples must be an integer in 1..{MAX_N_SAMPLES}, got {n_samples!r}")
    limit = max_seq_len or (1 << 20)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 2 <= seq_len <= limit:
        raise CalibrationError(f"seq_len must be an integer in 2..{limit} (the model's context), got {seq_len!r}")


def build_calibration(tokenizer, texts: list[str], n_samples: int = DEFAULT_N_SAMPLES,
                      seq_len: int = DEFAULT_SEQ_LEN, seed: int | None = 0, max_seq_len: int | None = None,
                      source: str = "texts") -> CalibrationSet:
    """Tokenize `texts`, join them with EOS, cut into `seq_len`-token sequences and pick `n_samples` of them."""
    check_sizes(n_samples, seq_len, max_seq_len)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CalibrationError("the tokenizer has no eos_token: cannot join calibration texts")
    stream: list[int] = []
    for text in texts:
        if text and text.strip():
            stream.extend(tokenizer.encode(text, add_special_tokens=False))
            stream.append(eos)
    available = len(stream) // seq_len
    if available < n_samples:
        raise CalibrationError(
            f"{source}: {len(stream)} tokens give {available} sequences of {seq_len} tokens, "
            f"but n_samples={n_samples} were asked for; give more text or lower n_samples/seq_len")
    chunks = torch.tensor(stream[: available * seq_len], dtype=torch.long).view(available, seq_len)
    if seed is None:
        chosen = torch.arange(n_samples)
    else:
        chosen = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n_samples].sort().values
    tokens = chunks[chosen].contiguous()
    settings = CalibrationSettings(source, n_samples, seq_len, seed)
    return CalibrationSet(tokens, torch.ones_like(tokens, dtype=torch.bool), settings)


def load_calibration(tokenizer, source: str | Path, n_samples: int = DEFAULT_N_SAMPLES,
                     seq_len: int = DEFAULT_SEQ_LEN, seed: int | None = 0, max_seq_len: int | None = None,
                     split: str = "validation", text_field: str = "text",
                     dataset_config: str | None = None) -> CalibrationSet:
    """`read_texts` + `build_calibration`: the one call the CLI makes."""
    check_sizes(n_samples, seq_len, max_seq_len)
    texts = read_texts(source, split, text_field, dataset_config)
    return build_calibration(tokenizer, texts, n_samples, seq_len, seed, max_seq_len, source=str(source))
