"""Generation: batched prefill and decode over a static KV cache, sampling, the static-shape (graph) decode step."""
from .generation import DECODE_MODES, ContextLengthError, Engine, Step
from .sampling import Sampling, greedy, sample

__all__ = ["DECODE_MODES", "ContextLengthError", "Engine", "Step", "Sampling", "greedy", "sample"]
