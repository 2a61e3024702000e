"""Checkpoint folders in and out: safetensors reading, tokenizer, GGUF import, export, atomic publishing."""
