"""The decoder stack as plain PyTorch modules, its builder, attention backends, KV cache and ops."""
from .builder import ModelBuilder
from .cache import KVCache
from .layers import DecoderLayer, StepContext, Transformer, rope_tables, step_context
from .ops import select_ops

__all__ = ["ModelBuilder", "KVCache", "DecoderLayer", "StepContext", "Transformer", "rope_tables", "step_context",
           "select_ops"]
