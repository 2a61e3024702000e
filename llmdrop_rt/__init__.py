"""llmdrop-rt: a lean LLM runtime in which dropped attention/MLP modules are physically absent."""
