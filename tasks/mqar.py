"""Multi-query associative recall (MQAR), after Zoology's `multiquery_ar` (Arora, Eyuboglu et al. 2023).

One example, with N=2 pairs, num_passes=1 and random_non_queries=False:

    inputs:  k1   v1   k2   v2   0    0    k2   0    0    0    k1   0   ...
    labels: -100 -100 -100 -100 -100 -100  v2  -100 -100 -100  v1  -100 ...

The context lists N key-value pairs (num_passes times over, the "just read twice" variant); the query
region then asks for every key once, and the label at a query key is the value bound to it. Keys
come from [1, V//2) and values from [V//2, V), so token 0 marks "no query here"; with
random_non_queries those zeros become uniformly random tokens.

Query gaps follow a power law, p(gap) ~ power_a * (gap + 1) ** (power_a - 1): with the default
power_a=0.01 most queries sit near the start of the query region, as repeated bigrams do in text;
power_a=1 spreads them uniformly.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from tasks._common import generate_blocks
from tasks.registry import IGNORE_INDEX, TaskError, register_task

# Examples generated at once. The `taken` mask of the key sampler holds BLOCK * V/2 booleans,
# and the gap sampler BLOCK * seq_len/2 floats, so this bounds memory for any vocab / length.
BLOCK = 4096


@dataclass
class MQARConfig:
    name: str = "mqar"
    vocab_size: int = 8192  # V; keys come from [1, V//2), values from [V//2, V)
    seq_len: int = 64  # tokens per example (context + query region)
    num_kv_pairs: int = 4  # N key-value pairs per example; each key is queried exactly once
    power_a: float = 0.01  # query-gap power law in (0, 1]; small = queries near the front, 1 = uniform
    num_passes: int = 1  # times the context lists the same pairs in the same order (JRT when > 1)
    random_non_queries: bool = True  # fill non-query slots with random tokens instead of 0

    def validate(self) -> None:
        if self.seq_len < 2 or self.seq_len % 2:
            raise TaskError(f"task.seq_len={self.seq_len}: must be even and >= 2")
        if self.num_kv_pairs < 1:
            raise TaskError(f"task.num_kv_pairs={self.num_kv_pairs}: must be >= 1")
        if self.num_passes < 1:
            raise TaskError(f"task.num_passes={self.num_passes}: must be >= 1")
        if not 0 < self.power_a <= 1:
            raise TaskError(f"task.power_a={self.power_a}: must be in (0, 1]")
        # The context takes 2 * N * num_passes tokens; the query region needs 2 tokens per query.
        if 2 * self.num_kv_pairs * (self.num_passes + 1) > self.seq_len:
            raise TaskError(
                f"task.num_kv_pairs={self.num_kv_pairs}: needs 2 * num_kv_pairs * (num_passes + 1) "
                f"<= seq_len (num_passes={self.num_passes}, seq_len={self.seq_len})"
            )
        check_vocabulary(self)


def check_vocabulary(cfg) -> None:
    """Keys come from [1, V/2) without replacement, and Zoology asserts V > L (not needed by the layout; it
    keeps our configs valid there)."""
    num_keys = cfg.vocab_size // 2 - 1
    if cfg.num_kv_pairs > num_keys:
        raise TaskError(
            f"task.num_kv_pairs={cfg.num_kv_pairs}: only {num_keys} distinct keys in "
            f"[1, vocab_size // 2) (vocab_size={cfg.vocab_size})"
        )
    if cfg.vocab_size <= cfg.seq_len:
        raise TaskError(f"task.vocab_size={cfg.vocab_size}: needs vocab_size > seq_len (seq_len={cfg.seq_len})")


@register_task("mqar", MQARConfig)
def generate_mqar(cfg: MQARConfig, num_examples: int, seed: int) -> tuple[Tensor, Tensor]:
    """Multi-query associative recall (Zoology): recall the value bound to each queried key."""
    cfg.validate()
    return generate_blocks(cfg, num_examples, seed, BLOCK, lambda n, gen: _generate_block(cfg, n, gen))


def _generate_block(cfg: MQARConfig, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    N, V = cfg.num_kv_pairs, cfg.vocab_size
    # Zoology draws the values without replacement too, so no two keys share a value.
    keys = _sample_distinct(n, N, low=1, high=V // 2, gen=gen)
    values = _sample_distinct(n, N, low=V // 2, high=V, gen=gen)

    context = torch.stack([keys, values], dim=2).reshape(n, 2 * N).repeat(1, cfg.num_passes)
    return place_queries(cfg, context, keys, values, gen)


def place_queries(cfg, context: Tensor, keys: Tensor, answers: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """After the context [n, C], ask each key once in the query region; the label at a key is its answer.

    Shared by the MQAR variants (their contexts differ, the query region does not).
    """
    n, C = context.shape
    N, V, L = keys.shape[1], cfg.vocab_size, cfg.seq_len
    # Gap g puts a query at offset 2g of the query region. Zoology assigns the i-th key of the
    # context to the i-th gap drawn; topk returns the gaps in draw order, so this keeps its bias
    # (early keys tend to be asked early when power_a < 1). The constant factor power_a drops out.
    gap_log_weights = (cfg.power_a - 1) * torch.arange(1, (L - C) // 2 + 1, dtype=torch.float32).log()
    gaps = _sample_weighted_distinct(gap_log_weights, n, N, gen)
    query_pos = C + 2 * gaps

    # Zoology builds seq_len + 1 tokens and shifts by one; its last token is always dropped and the
    # label of the token after a query key lands on the key itself, which is what we write directly.
    inputs = torch.cat([context, torch.zeros(n, L - C, dtype=torch.int64)], dim=1)
    inputs.scatter_(1, query_pos, keys)
    labels = torch.full((n, L), IGNORE_INDEX, dtype=torch.int64)
    labels.scatter_(1, query_pos, answers)

    if cfg.random_non_queries:
        # As in Zoology: any token, so filler may even repeat a key (an unlabelled decoy).
        filler = torch.randint(V, (n, L), generator=gen)
        inputs = torch.where(inputs == 0, filler, inputs)
    return inputs, labels


def _sample_distinct(rows: int, count: int, low: int, high: int, gen: torch.Generator) -> Tensor:
    """Per row, `count` distinct integers from [low, high): a uniform random subset in random order."""
    # Floyd's algorithm: for j = size-count .. size-1 draw t in [0, j] and take t, or j if t is taken
    # (j cannot be taken yet). `count` vectorised steps, instead of ranking noise over the whole range.
    size = high - low
    taken = torch.zeros(rows, size, dtype=torch.bool)
    row = torch.arange(rows)
    picks = []
    for j in range(size - count, size):
        t = torch.randint(j + 1, (rows,), generator=gen)
        t = torch.where(taken[row, t], j, t)
        taken[row, t] = True
        picks.append(t)
    # Floyd yields a uniform subset but not a uniform order (late picks skew high): shuffle it.
    order = torch.rand(rows, count, generator=gen).argsort(dim=1)
    return low + torch.stack(picks, dim=1).gather(1, order)


def _sample_weighted_distinct(log_weights: Tensor, rows: int, count: int, gen: torch.Generator) -> Tensor:
    """Per row, `count` distinct indices drawn one by one with p ~ exp(log_weights), in draw order."""
    # Gumbel-top-k: the top-k of log p + Gumbel noise, sorted, is distributed exactly like k sequential
    # draws without replacement (what numpy's choice(replace=False, p=p) does). -log(Exp(1)) ~ Gumbel.
    gumbel = -torch.empty(rows, len(log_weights)).exponential_(generator=gen).log()
    return (log_weights + gumbel).topk(count, dim=1).indices
