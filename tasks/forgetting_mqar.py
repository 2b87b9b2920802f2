"""Forgetting MQAR, after Zoology's `forgetting_mqar`: some keys are re-assigned and the last value wins.

One example, with N=3 pairs, num_updates=1 and random_non_queries=False:

    inputs:  A   5   B   3   C   7   A   9   0    0    B    0    A    0    C   ...
    labels: -100 ... (no label in the context)         3   -100   9  -100   7   ...

The context lists N key-value pairs, then `num_updates` of those keys again with new values (a
random subset of the keys, in random order); the query region asks for every key once, and the label
is the key's last value. Keys, values, the query-gap power law and the filler are MQAR's (tasks/mqar.py).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from tasks._common import generate_blocks
from tasks.mqar import BLOCK, _sample_distinct, check_vocabulary, place_queries
from tasks.registry import TaskError, register_task


@dataclass
class ForgettingMQARConfig:
    name: str = "forgetting_mqar"
    vocab_size: int = 8192  # V; keys come from [1, V//2), values from [V//2, V)
    seq_len: int = 64  # tokens per example (context + query region)
    num_kv_pairs: int = 4  # N distinct keys per example; each is queried exactly once
    num_updates: int = 2  # keys re-assigned a new value after the N pairs; queries expect the new value
    power_a: float = 0.01  # query-gap power law in (0, 1]; small = queries near the front, 1 = uniform
    random_non_queries: bool = True  # fill non-query slots with random tokens instead of 0

    def validate(self) -> None:
        if self.seq_len < 2 or self.seq_len % 2:
            raise TaskError(f"task.seq_len={self.seq_len}: must be even and >= 2")
        if self.num_kv_pairs < 1:
            raise TaskError(f"task.num_kv_pairs={self.num_kv_pairs}: must be >= 1")
        if not 0 <= self.num_updates <= self.num_kv_pairs:
            raise TaskError(f"task.num_updates={self.num_updates}: must be in [0, num_kv_pairs={self.num_kv_pairs}]")
        if not 0 < self.power_a <= 1:
            raise TaskError(f"task.power_a={self.power_a}: must be in (0, 1]")
        needed = 2 * (self.num_kv_pairs + self.num_updates) + 2 * self.num_kv_pairs
        if needed > self.seq_len:
            raise TaskError(
                f"task.seq_len={self.seq_len}: needs 2 * (num_kv_pairs + num_updates) + 2 * num_kv_pairs = "
                f"{needed} tokens (num_kv_pairs={self.num_kv_pairs}, num_updates={self.num_updates})"
            )
        check_vocabulary(self)


@register_task("forgetting_mqar", ForgettingMQARConfig)
def generate_forgetting_mqar(cfg: ForgettingMQARConfig, num_examples: int, seed: int) -> tuple[Tensor, Tensor]:
    """Forgetting MQAR (Zoology): some keys are re-assigned later in the context; recall the last value."""
    cfg.validate()
    return generate_blocks(cfg, num_examples, seed, BLOCK, lambda n, gen: _generate_block(cfg, n, gen))


def _generate_block(cfg: ForgettingMQARConfig, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    N, U, V = cfg.num_kv_pairs, cfg.num_updates, cfg.vocab_size
    keys = _sample_distinct(n, N, low=1, high=V // 2, gen=gen)
    values = _sample_distinct(n, N, low=V // 2, high=V, gen=gen)
    final_values = values.clone()
    context = torch.stack([keys, values], dim=2).reshape(n, 2 * N)
    if U:
        updated = _sample_distinct(n, U, low=0, high=N, gen=gen)  # which keys, in update order
        old = values.gather(1, updated)
        # A new value differs from the key's old one (any other value, as in Zoology); Zoology compares
        # with the j-th key's value instead of the updated key's, which can leave a key "updated" to its
        # own value; here an update always changes the answer.
        new = V // 2 + torch.randint(V - V // 2 - 1, (n, U), generator=gen)
        new = torch.where(new >= old, new + 1, new)
        final_values.scatter_(1, updated, new)
        updates = torch.stack([keys.gather(1, updated), new], dim=2).reshape(n, 2 * U)
        context = torch.cat([context, updates], dim=1)
    return place_queries(cfg, context, keys, final_values, gen)
