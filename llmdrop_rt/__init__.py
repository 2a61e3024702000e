"""llmdrop-rt: a lean LLM runtime in which dropped attention/MLP modules are physically absent.

    import llmdrop_rt
    llm = llmdrop_rt.load("path/to/checkpoint", drop_attn=[20, 22, 24])
    print(llm.generate("The capital of France is", max_new_tokens=16))
"""
from .config import ConfigError, DropPlan, ModelConfig
from .runtime import LLM, load

__all__ = ["load", "LLM", "DropPlan", "ModelConfig", "ConfigError"]
