"""DeciLM (model_type "nemotron-nas") configuration, as written by llmdrop-rt's `decilm` export.

A Llama configuration plus `block_configs`, one entry per layer, saying whether the layer has attention and an
MLP. Readers of this format (vLLM, SGLang) read the entries by attribute (`block.attention.no_op`), so they are
held as small objects and written back to JSON as plain dicts.
"""
from __future__ import annotations

from transformers import LlamaConfig


class BlockPart:
    """One layer's attention or ffn entry: its JSON fields as attributes."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __repr__(self):
        return f"BlockPart({self.__dict__})"


class BlockConfig:
    """One layer: `attention` and `ffn`, each with `no_op` (the module is absent)."""

    def __init__(self, attention: dict | BlockPart, ffn: dict | BlockPart, **extra):
        self.attention = attention if isinstance(attention, BlockPart) else BlockPart(**attention)
        self.ffn = ffn if isinstance(ffn, BlockPart) else BlockPart(**ffn)
        self.__dict__.update(extra)

    def to_dict(self) -> dict:
        return {key: value.to_dict() if isinstance(value, BlockPart) else value for key, value in self.__dict__.items()}

    def __repr__(self):
        return f"BlockConfig({self.to_dict()})"


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"
    block_configs: list | None = None

    def __post_init__(self, **kwargs):
        self.block_configs = [block if isinstance(block, BlockConfig) else BlockConfig(**block)
                              for block in self.block_configs or []]
        super().__post_init__(**kwargs)
        # readers written for older transformers (SGLang's DeciLM) take getattr(config, "rope_theta", 10000)
        if getattr(self, "rope_theta", None) is None and self.rope_parameters:
            self.rope_theta = self.rope_parameters["rope_theta"]

    def validate_architecture(self):
        super().validate_architecture()
        if len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(f"block_configs has {len(self.block_configs)} entries, expected num_hidden_layers="
                             f"{self.num_hidden_layers}")

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["block_configs"] = [block.to_dict() for block in self.block_configs]
        return output
