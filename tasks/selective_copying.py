"""Selective copying with a long noise span, as in the Mamba paper (Gu & Dao 2023).

One example (V=16: tokens from [1, 15), noise 0, copy marker 15; m=3, seq_len=12):

    inputs:  0   0   4   0   0   9   0   2   0   15  15  15
    labels: -100 ...                             4   9   2

m tokens sit at uniformly random positions of a noise span of seq_len - m tokens; then m copy markers,
at which the model outputs the tokens in order. Unlike MAD's variant (tasks/mad.py), the tokens may sit
anywhere in the span, the last one included, and the span can be long: train at one length and test at
longer ones with data.test_slices.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from tasks._common import block_size, generate_blocks, random_positions
from tasks.registry import IGNORE_INDEX, TaskError, register_task


@dataclass
class SelectiveCopyingConfig:
    name: str = "selective_copying"
    vocab_size: int = 16  # V: tokens to copy from [1, V-1); 0 is noise, V-1 the copy marker
    seq_len: int = 256  # noise span (seq_len - m) plus m markers (the Mamba paper uses 4096)
    num_tokens_to_copy: int = 16  # m tokens to copy, in order

    def validate(self) -> None:
        if self.vocab_size < 3:
            raise TaskError(f"task.vocab_size={self.vocab_size}: must be >= 3 (noise, marker, one token)")
        if self.num_tokens_to_copy < 1:
            raise TaskError(f"task.num_tokens_to_copy={self.num_tokens_to_copy}: must be >= 1")
        if self.seq_len < 2 * self.num_tokens_to_copy:
            raise TaskError(
                f"task.seq_len={self.seq_len}: must be >= 2 * num_tokens_to_copy = {2 * self.num_tokens_to_copy}"
            )


@register_task("selective_copying", SelectiveCopyingConfig)
def generate_selective_copying(cfg: SelectiveCopyingConfig, num_examples: int, seed: int) -> tuple[Tensor, Tensor]:
    """Selective copying (Mamba paper): tokens at random positions in a long noise span; output them in order."""
    cfg.validate()
    m, L, V = cfg.num_tokens_to_copy, cfg.seq_len, cfg.vocab_size
    span = L - m

    def make_block(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        tokens = 1 + torch.randint(V - 2, (n, m), generator=gen)
        pos = random_positions(n, m, span, gen)
        inputs = torch.zeros(n, L, dtype=torch.int64).scatter_(1, pos, tokens)
        inputs[:, span:] = V - 1
        labels = torch.full((n, L), IGNORE_INDEX)
        labels[:, span:] = tokens
        return inputs, labels

    return generate_blocks(cfg, num_examples, seed, block_size(L), make_block)
