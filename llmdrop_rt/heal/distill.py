"""The `distill` objective: KL divergence from the undropped (teacher) model's next-token distributions.

The teacher runs once over the training sequences, before training. Its full logits would take
sequences x tokens x vocabulary floats (SmolLM2: 200 KB per token), so only each position's `top_k` largest
log-probabilities and their token ids are kept, written batch by batch into memory-mapped files in a temporary
folder; training reads back the rows of each batch. The loss is the exact KL divergence between the teacher's and
the student's distributions over the partition {each of the teacher's top-k tokens, all other tokens together}:
it is the full KL when top_k is the vocabulary size and a lower bound of it otherwise, and unlike a KL on
renormalized top-k probabilities it still pulls the student's mass off the tokens the teacher rules out.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class TeacherTopK:
    """Per position of each training sequence: the teacher's `k` largest log-probabilities and their token ids."""

    def __init__(self, log_probs: np.ndarray, token_ids: np.ndarray):
        self.log_probs, self.token_ids = log_probs, token_ids

    @classmethod
    def compute(cls, teacher_logits, tokens: torch.Tensor, k: int, folder: str | Path, batch_size: int = 1,
                progress: bool = True) -> "TeacherTopK":
        """Run `teacher_logits` ([B, T] ids -> [B, T, V] logits) over `tokens` [N, T] in batches and keep the top
        `k` of each position, in files under `folder`; memory holds one batch's logits at a time."""
        from tqdm.auto import tqdm

        folder = Path(folder)
        rows, length = tokens.shape
        log_probs = np.lib.format.open_memmap(folder / "teacher_log_probs.npy", mode="w+", dtype=np.float32,
                                              shape=(rows, length, k))
        token_ids = np.lib.format.open_memmap(folder / "teacher_token_ids.npy", mode="w+", dtype=np.int32,
                                              shape=(rows, length, k))
        for begin in tqdm(range(0, rows, batch_size), desc="teacher logits", disable=not progress, leave=False):
            batch = tokens[begin: begin + batch_size]
            top = torch.topk(F.log_softmax(teacher_logits(batch).float(), dim=-1), k, dim=-1)
            log_probs[begin: begin + len(batch)] = top.values.cpu().numpy()
            token_ids[begin: begin + len(batch)] = top.indices.cpu().numpy()
        log_probs.flush()
        token_ids.flush()
        return cls(log_probs, token_ids)

    def rows(self, indices: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities float32, token ids int64) of the given sequences, [len(indices), T, k] each."""
        picked = indices.tolist()
        log_probs = torch.from_numpy(np.ascontiguousarray(self.log_probs[picked]))
        token_ids = torch.from_numpy(np.ascontiguousarray(self.token_ids[picked])).long()
        return log_probs.to(device), token_ids.to(device)


def top_k_kl(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor,
             teacher_token_ids: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the partition {top-k tokens, the rest} (module doc)."""
    student_log_probs = F.log_softmax(student_logits.float(), dim=-1)
    student_top = student_log_probs.gather(-1, teacher_token_ids)
    teacher_top = teacher_log_probs.exp()
    kl = (teacher_top * (teacher_log_probs - student_top)).sum(-1)
    teacher_rest = (1 - teacher_top.sum(-1)).clamp_min(0)
    # log(1 - sum of the student's top-k probabilities), accurate when that sum is close to 1
    student_rest = torch.log((-torch.expm1(torch.logsumexp(student_top, dim=-1))).clamp_min(1e-30))
    kl = kl + torch.xlogy(teacher_rest, teacher_rest) - teacher_rest * student_rest
    return kl.mean()
