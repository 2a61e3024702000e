"""Healing a dropped model (ShortGPT's and Gromov et al.'s "healing" after layer removal): LoRA adapters on the
kept projections trained on a text, by next-token loss or by distillation from the undropped model, merged into
the weights and written as a normal checkpoint. `python -m llmdrop_rt heal`; see docs/healing.md."""
from .healing import OBJECTIVES, HealError, HealResult, HealSettings, heal_model, output_format

__all__ = ["OBJECTIVES", "HealError", "HealResult", "HealSettings", "heal_model", "output_format"]
