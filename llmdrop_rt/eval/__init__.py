"""Task evaluation: the lm-eval model `llmdrop_rt` and local offline tasks."""
