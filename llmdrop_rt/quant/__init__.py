"""4-bit weights: AWQ/GPTQ formats, QuantLinear, and the GPTQModel bridge that makes such checkpoints."""
