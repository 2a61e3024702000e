"""Small local lm-eval tasks that run offline (no dataset hub): `llmdrop_mc` (multiple choice, acc/acc_norm)
and `llmdrop_tempest` (rolling perplexity). See README.md in this folder for their content and licence."""
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("llmdrop_mc", "llmdrop_tempest")
