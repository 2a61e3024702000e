"""Tokenizer from a checkpoint folder's tokenizer.json (the `tokenizers` library) plus tokenizer_config.json's
special tokens and the chat template (see io.chat_template).

A folder without tokenizer.json still gives a Tokenizer: token ids go in and out of the model as usual, and only
turning text into ids or back fails, with an error naming the folder and the missing file.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from ..config import ConfigError, read_json
from ..validation import STRING, Rule, check_fields
from .chat_template import ChatTemplateError, find_chat_template, render_chat_template

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKEN = Rule("a token string or an AddedToken object with a string 'content'",
                     lambda v: isinstance(v, str) or isinstance(v, dict) and isinstance(v.get("content"), str),
                     nullable=True)
CONFIG_FIELDS = {"bos_token": SPECIAL_TOKEN, "eos_token": SPECIAL_TOKEN, "pad_token": SPECIAL_TOKEN,
                 "unk_token": SPECIAL_TOKEN, "tokenizer_class": STRING.or_null()}


class TokenizerMissingError(FileNotFoundError):
    """Text was given or asked for, but the folder has no tokenizer files."""


def _token_text(value):
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, folder: str | Path):
        self.folder = folder = Path(folder)
        path = folder / TOKENIZER_FILE
        self._tok = None
        if path.is_file():
            try:
                self._tok = _HFTokenizer.from_file(str(path))
            except Exception as e:  # the tokenizers library raises plain Exceptions on bad files
                raise ValueError(f"{path}: cannot be read as a tokenizer ({e})") from None
        config_path = folder / CONFIG_FILE
        config = read_json(config_path) if config_path.is_file() else {}
        check_fields(config, CONFIG_FIELDS, str(config_path), ConfigError)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.chat_template = find_chat_template(folder, config, config_path)
        self.eos_token_id = self.token_id(self.eos_token)
        self.pad_token_id = self.token_id(self.pad_token)

    @property
    def has_vocabulary(self) -> bool:
        return self._tok is not None

    def _vocabulary(self) -> _HFTokenizer:
        if self._tok is None:
            raise TokenizerMissingError(f"{self.folder}: no {TOKENIZER_FILE}, so text cannot be encoded or decoded "
                                        "(llmdrop-rt reads fast-tokenizer files only); pass and take token ids")
        return self._tok

    def token_id(self, token: str | None) -> int | None:
        return None if token is None or self._tok is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._vocabulary().get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._vocabulary().encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._vocabulary().decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ChatTemplateError(f"{self.folder}: no chat template (neither {CONFIG_FILE}'s chat_template nor "
                                    "chat_template.jinja)")
        return render_chat_template(
            self.chat_template,
            str(self.folder),
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
