"""Single-query associative recall, as in H3 (Fu, Dao et al. 2023).

One example (V=40: keys from [1, 20), values from [20, 40), num_kv_pairs=3, seq_len=8):

    inputs:  0   k1  v1  k2  v2  k3  v3  k2
    labels: -100 ...                     v2

Distinct keys each bound to a value (values may repeat), then one key of the example as the query;
its label is the key's value. num_kv_pairs=0 fills the sequence with pairs; a left pad token 0 makes up
an even length. Keys are distinct per example, so the answer is always defined.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from tasks._common import block_size, generate_blocks, random_distinct
from tasks.registry import IGNORE_INDEX, TaskError, register_task


@dataclass
class AssociativeRecallConfig:
    name: str = "associative_recall"
    vocab_size: int = 40  # V: keys from [1, V//2), values from [V//2, V); 0 pads
    seq_len: int = 31  # tokens per example: pairs and the query at the end
    num_kv_pairs: int = 0  # pairs per example; 0 = as many as fit, (seq_len - 1) // 2

    def pairs(self) -> int:
        return self.num_kv_pairs or (self.seq_len - 1) // 2

    def validate(self) -> None:
        if self.num_kv_pairs < 0:
            raise TaskError(f"task.num_kv_pairs={self.num_kv_pairs}: must be >= 0 (0 = fill the sequence)")
        if self.seq_len < 3 or 2 * self.pairs() + 1 > self.seq_len:
            raise TaskError(
                f"task.seq_len={self.seq_len}: must be >= 2 * num_kv_pairs + 1 and >= 3 "
                f"(num_kv_pairs={self.num_kv_pairs})"
            )
        num_keys = self.vocab_size // 2 - 1
        if self.pairs() > num_keys:
            raise TaskError(
                f"task.vocab_size={self.vocab_size}: only {max(num_keys, 0)} distinct keys in [1, vocab_size // 2) "
                f"for {self.pairs()} pairs (seq_len={self.seq_len}, num_kv_pairs={self.num_kv_pairs})"
            )


@register_task("associative_recall", AssociativeRecallConfig)
def generate_associative_recall(cfg: AssociativeRecallConfig, num_examples: int,
                                seed: int) -> tuple[Tensor, Tensor]:
    """Associative recall (H3): key-value pairs, then one key; output its value."""
    cfg.validate()
    N, V, L = cfg.pairs(), cfg.vocab_size, cfg.seq_len

    def make_block(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        keys = 1 + random_distinct((n,), N, V // 2 - 1, gen)
        values = V // 2 + torch.randint(V - V // 2, (n, N), generator=gen)
        query = torch.randint(N, (n, 1), generator=gen)
        body = torch.stack([keys, values], dim=2).reshape(n, 2 * N)
        pad = torch.zeros(n, L - 2 * N - 1, dtype=torch.int64)
        inputs = torch.cat([pad, body, keys.gather(1, query)], dim=1)
        labels = torch.full((n, L), IGNORE_INDEX)
        labels[:, -1] = values.gather(1, query)[:, 0]
        return inputs, labels

    return generate_blocks(cfg, num_examples, seed, block_size(max(L, V)), make_block)
