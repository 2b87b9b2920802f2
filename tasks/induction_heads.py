"""Induction heads, as in the Mamba paper (Gu & Dao 2023, after Olsson et al. 2022).

One example (V=16: tokens from [0, 15), trigger 15):

    inputs:  3   9   15   4   7   1  ...  12   15
    labels: -100 ...                      -100  4

Random tokens hold the trigger token once at a random position, followed by the token to recall; the
last token is the trigger again, and its label is the token that followed the first trigger. Train at
one length and test at longer ones (data.test_slices) to measure length extrapolation.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from tasks._common import block_size, generate_blocks
from tasks.registry import IGNORE_INDEX, TaskError, register_task


@dataclass
class InductionHeadsConfig:
    name: str = "induction_heads"
    vocab_size: int = 16  # V: random tokens from [0, V-1); V-1 is the trigger
    seq_len: int = 256  # tokens per example (Mamba trains at 256 and tests up to 2^20)

    def validate(self) -> None:
        if self.vocab_size < 2:
            raise TaskError(f"task.vocab_size={self.vocab_size}: must be >= 2 (trigger, one token)")
        if self.seq_len < 3:
            raise TaskError(f"task.seq_len={self.seq_len}: must be >= 3 (trigger, answer, trigger)")


@register_task("induction_heads", InductionHeadsConfig)
def generate_induction_heads(cfg: InductionHeadsConfig, num_examples: int, seed: int) -> tuple[Tensor, Tensor]:
    """Induction heads (Mamba paper): after the trigger token reappears, output the token that followed it."""
    cfg.validate()
    L, V = cfg.seq_len, cfg.vocab_size

    def make_block(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        inputs = torch.randint(V - 1, (n, L), generator=gen)
        trigger = torch.randint(L - 2, (n, 1), generator=gen)  # the answer follows it, before the last token
        inputs.scatter_(1, trigger, V - 1)
        inputs[:, -1] = V - 1
        labels = torch.full((n, L), IGNORE_INDEX)
        labels[:, -1] = inputs.gather(1, trigger + 1)[:, 0]
        return inputs, labels

    return generate_blocks(cfg, num_examples, seed, block_size(L), make_block)
