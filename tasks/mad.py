"""The six MAD tasks (Poli et al. 2024, athms/mad-lab), their difficulty grids and the MAD score.

Task                   | MAD baseline                                  | lab task name
-----------------------|-----------------------------------------------|------------------------
in-context recall      | V=16, L=128, multi-query                      | mad_in_context_recall
noisy in-context recall| V=32 (16 noise tokens), L=128, 20% noise      | mad_noisy_recall
fuzzy in-context recall| V=16, L=128, keys/values of 1-3 tokens        | mad_fuzzy_recall
selective copying      | V=16, L=256, 16 tokens to copy                | mad_selective_copying
compression            | V=16, L=32                                    | mad_compression (see below)
memorisation           | V=256, L=32, one fixed key->value map         | mad_memorization

All use MAD's token layout and vocabulary split; the differences are stated where they occur:

- Recall tasks: MAD trains on every next token (`is_training`) and tests only the values of keys seen
  before in the sequence; the generators take `split` to do the same (`train_all_tokens=false` trains on
  the test positions only). MAD's sequence of L tokens is cut to L-1 by its shift; here it keeps L tokens
  (the extra last token is the probe's value, unsupervised).
- Metric: the lab's one accuracy (Zoology's: per-example mean over supervised positions, then the mean
  over examples). MAD uses torchmetrics' macro-averaged accuracy over all supervised tokens, so scores
  are close but not identical to published ones.
- Compression: MAD trains an autoencoder (the model encodes the sequence, the state at the compression
  token is decoded by an MLP). The lab's models are causal LMs, so here the model reads the tokens and
  then reproduces them after the compression token; a recurrent model must hold the sequence in its
  state (MAD's capacity), but attention can look back, so attention's scores are not MAD's.

MAD_GRIDS maps each task to MAD's difficulty settings (the baseline, then the baseline with one key
changed at a time, exactly as mad-lab's `make_benchmark_mad_configs`), as dotted `key=value` overrides;
MAD_TRAINING and MAD_SEARCH hold MAD's training protocol; `mad_scores` turns run results into MAD scores.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tasks._common import block_size, first_occurrence, generate_blocks, random_distinct
from tasks.registry import IGNORE_INDEX, TaskError, register_task

# --- in-context recall and noisy in-context recall ----------------------------------------------------


@dataclass
class InContextRecallConfig:
    name: str = "mad_in_context_recall"
    vocab_size: int = 16  # V: keys, values and (the last noise_vocab_size tokens) noise
    seq_len: int = 128  # tokens per example: seq_len // 2 key-value pairs, the last one a probe
    noise_vocab_size: int = 0  # the last tokens of the vocabulary, used only as noise
    frac_noise: float = 0.0  # chance that a pair slot holds two noise tokens instead of a pair
    train_all_tokens: bool = True  # MAD: train on every next token; false: only where the test scores

    def validate(self) -> None:
        _check_even_len(self, minimum=4)
        if self.noise_vocab_size < 0:
            raise TaskError(f"task.noise_vocab_size={self.noise_vocab_size}: must be >= 0")
        if not 0 <= self.frac_noise < 1:
            raise TaskError(f"task.frac_noise={self.frac_noise}: must be in [0, 1)")
        if self.frac_noise > 0 and self.noise_vocab_size == 0:
            raise TaskError(f"task.frac_noise={self.frac_noise}: needs noise_vocab_size > 0")
        if self.vocab_size - self.noise_vocab_size < 2:
            raise TaskError(
                f"task.vocab_size={self.vocab_size}: needs at least 2 tokens besides the "
                f"noise_vocab_size={self.noise_vocab_size} noise tokens (one key, one value)"
            )


@dataclass
class NoisyRecallConfig(InContextRecallConfig):
    name: str = "mad_noisy_recall"
    vocab_size: int = 32  # V: keys, values and (the last noise_vocab_size tokens) noise
    noise_vocab_size: int = 16  # the last tokens of the vocabulary, used only as noise
    frac_noise: float = 0.2  # chance that a pair slot holds two noise tokens instead of a pair


@register_task("mad_in_context_recall", InContextRecallConfig)
def generate_in_context_recall(cfg: InContextRecallConfig, num_examples: int, seed: int,
                               split: str = "test") -> tuple[Tensor, Tensor]:
    """MAD in-context recall: key-value pairs (keys repeat, same value); recall a seen key's value.

    Keys come from the first half of the non-noise vocabulary and values from the second; each example
    draws its own key->value map, then seq_len/2 - 1 pairs with keys drawn with replacement, then a
    probe pair whose key is one of the keys shown. Every value whose key appeared earlier is scored.
    """
    cfg.validate()
    return _recall(cfg, num_examples, seed, split)


@register_task("mad_noisy_recall", NoisyRecallConfig)
def generate_noisy_recall(cfg: NoisyRecallConfig, num_examples: int, seed: int,
                          split: str = "test") -> tuple[Tensor, Tensor]:
    """MAD noisy in-context recall: in-context recall with pairs replaced by noise tokens at random."""
    cfg.validate()
    return _recall(cfg, num_examples, seed, split)


def _recall(cfg: InContextRecallConfig, num_examples: int, seed: int, split: str) -> tuple[Tensor, Tensor]:
    content = cfg.vocab_size - cfg.noise_vocab_size
    num_keys = content // 2
    slots = cfg.seq_len // 2 - 1  # pairs before the probe
    block = block_size(slots + num_keys)

    def make_block(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        value_of = num_keys + torch.randint(content - num_keys, (n, num_keys), generator=gen)
        keys = torch.randint(num_keys, (n, slots), generator=gen)
        noise = torch.zeros(n, slots, dtype=torch.bool)
        if cfg.frac_noise > 0:
            noise = torch.rand(n, slots, generator=gen) < cfg.frac_noise
            # MAD keeps one random slot a real pair so that there is a key to probe
            noise[torch.arange(n), torch.randint(slots, (n,), generator=gen)] = False
        pairs = torch.stack([keys, value_of.gather(1, keys)], dim=2)
        if cfg.frac_noise > 0:
            noise_tokens = content + torch.randint(cfg.noise_vocab_size, (n, slots, 2), generator=gen)
            pairs = torch.where(noise[..., None], noise_tokens, pairs)
        # A value is scored when its key appeared in an earlier (non-noise) pair; noise slots get unique ids.
        ids = torch.where(noise, num_keys + torch.arange(slots), keys)
        _, is_first = first_occurrence(ids)
        seen_before = ~is_first & ~noise
        # The probe asks a key uniformly among the distinct keys shown (MAD: choice over keys_presented).
        shown = torch.zeros(n, num_keys + 1, dtype=torch.bool).scatter_(
            1, torch.where(noise, num_keys, keys), True)[:, :num_keys]
        probe = torch.rand(n, num_keys, generator=gen).masked_fill(~shown, -1.0).argmax(dim=1, keepdim=True)
        probe_pair = torch.cat([probe, value_of.gather(1, probe)], dim=1)
        inputs = torch.cat([pairs.reshape(n, 2 * slots), probe_pair], dim=1)

        scored = torch.zeros(n, cfg.seq_len, dtype=torch.bool)  # positions whose label is tested
        scored[:, 0:2 * slots:2] = seen_before
        scored[:, 2 * slots] = True
        return inputs, _next_token_labels(inputs, scored, all_tokens=split == "train" and cfg.train_all_tokens)

    return generate_blocks(cfg, num_examples, seed, block, make_block)


def _next_token_labels(inputs: Tensor, scored: Tensor, all_tokens: bool, start: Tensor | None = None) -> Tensor:
    """Labels that ask for the next input token: at `scored` positions, or at all from `start` on."""
    labels = torch.full_like(inputs, IGNORE_INDEX)
    labels[:, :-1] = inputs[:, 1:]
    if all_tokens:
        keep = torch.ones_like(scored)
        keep[:, -1] = False
        if start is not None:  # left padding is no target
            keep &= torch.arange(inputs.shape[1]) >= start[:, None] - 1
    else:
        keep = scored
    return labels.masked_fill(~keep, IGNORE_INDEX)


# --- fuzzy in-context recall --------------------------------------------------------------------------


@dataclass
class FuzzyRecallConfig:
    name: str = "mad_fuzzy_recall"
    vocab_size: int = 16  # V: keys [0, (V-1)//2), values [(V-1)//2, V-1), padding V-1
    seq_len: int = 128  # tokens per example, left-padded
    k_motif_size: int = 3  # keys are 1..k_motif_size distinct key tokens (always k_motif_size at test)
    v_motif_size: int = 3  # values are 1..v_motif_size distinct value tokens
    train_all_tokens: bool = True  # MAD: train on every next token; false: only where the test scores

    def validate(self) -> None:
        for key in ("k_motif_size", "v_motif_size"):
            if getattr(self, key) < 1:
                raise TaskError(f"task.{key}={getattr(self, key)}: must be >= 1")
        num_keys = (self.vocab_size - 1) // 2
        num_values = self.vocab_size - 1 - num_keys
        if num_keys < self.k_motif_size or num_values < self.v_motif_size:
            raise TaskError(
                f"task.vocab_size={self.vocab_size}: {num_keys} key and {num_values} value tokens cannot "
                f"form motifs of k_motif_size={self.k_motif_size} / v_motif_size={self.v_motif_size} "
                "distinct tokens"
            )
        longest_pair = self.k_motif_size + self.v_motif_size
        if self.seq_len < 2 * longest_pair:
            raise TaskError(
                f"task.seq_len={self.seq_len}: must be >= 2 * (k_motif_size + v_motif_size) = {2 * longest_pair} "
                "(one pair and the probe)"
            )


@register_task("mad_fuzzy_recall", FuzzyRecallConfig)
def generate_fuzzy_recall(cfg: FuzzyRecallConfig, num_examples: int, seed: int,
                          split: str = "test") -> tuple[Tensor, Tensor]:
    """MAD fuzzy in-context recall: keys and values are motifs of several tokens; recall a seen key's value.

    Training keys have 1..k_motif_size tokens, test keys exactly k_motif_size (as in MAD); values have
    1..v_motif_size tokens. Pairs fill the sequence (left-padded), a repeated key keeps its first value,
    and a final probe repeats one of the pairs; every value token of a repeated key is scored. Unlike
    MAD, the probe's key is always one shown before (MAD plants a random probe that may be cut off).
    """
    cfg.validate()
    K = (cfg.vocab_size - 1) // 2
    num_values = cfg.vocab_size - 1 - K
    kmax, vmax, L = cfg.k_motif_size, cfg.v_motif_size, cfg.seq_len
    budget = L - (kmax + vmax)  # tokens for the pairs before the probe
    slots = budget // 2 + 1  # more than can fit: every pair has >= 2 tokens
    block = block_size(slots * max(K, num_values, kmax + vmax))

    def make_block(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if split == "train":
            key_len = torch.randint(1, kmax + 1, (n, slots), generator=gen)
        else:
            key_len = torch.full((n, slots), kmax)
        value_len = torch.randint(1, vmax + 1, (n, slots), generator=gen)
        key_tok = random_distinct((n, slots), kmax, K, gen)  # a uniform motif of distinct tokens
        value_tok = K + random_distinct((n, slots), vmax, num_values, gen)
        # Key identity: its tokens as base-(K+1) digits (0 = no token), so motifs of any size differ.
        digits = torch.where(torch.arange(kmax) < key_len[..., None], key_tok + 1, 0)
        key_id = (digits * (K + 1) ** torch.arange(kmax)).sum(-1)
        first, is_first = first_occurrence(key_id)
        # A repeated key keeps the value (tokens and length) of its first occurrence.
        value_tok = value_tok.gather(1, first[..., None].expand(-1, -1, vmax))
        value_len = value_len.gather(1, first)
        fits = (key_len + value_len).cumsum(dim=1) <= budget  # a prefix of the slots
        count = fits.sum(dim=1)
        probe = (torch.rand(n, generator=gen) * count).long()[:, None]

        def with_probe(x: Tensor, probe_value) -> Tensor:
            extra = x.gather(1, probe.view(n, 1, *([1] * (x.dim() - 2))).expand(n, 1, *x.shape[2:]))
            return torch.cat([x, extra if probe_value is None else torch.full_like(extra, probe_value)], dim=1)

        tokens = with_probe(torch.cat([key_tok, value_tok], dim=2), None)  # [n, slots + 1, kmax + vmax]
        key_len, value_len = with_probe(key_len, None), with_probe(value_len, None)
        fits, seen = with_probe(fits, True), with_probe(~is_first, True)
        part = torch.arange(kmax + vmax)
        present = torch.where(part < kmax, part < key_len[..., None], part - kmax < value_len[..., None])
        present &= fits[..., None]
        scored = present & (part >= kmax) & seen[..., None]

        # Right-align the present tokens (left padding), in order.
        present, tokens, scored = present.reshape(n, -1), tokens.reshape(n, -1), scored.reshape(n, -1)
        total = present.sum(dim=1)
        start = L - total
        pos = torch.where(present, start[:, None] + present.cumsum(dim=1) - 1, L)  # L = discarded
        inputs = torch.full((n, L + 1), cfg.vocab_size - 1).scatter_(1, pos, tokens)[:, :L]
        scored_at = torch.zeros(n, L + 1, dtype=torch.bool).scatter_(1, pos, scored)[:, :L]
        # scored_at marks the value tokens to predict; the label sits one position earlier.
        shifted = torch.zeros_like(scored_at)
        shifted[:, :-1] = scored_at[:, 1:]
        return inputs, _next_token_labels(inputs, shifted, split == "train" and cfg.train_all_tokens, start)

    return generate_blocks(cfg, num_examples, seed, block, make_block)


# --- selective copying ------------------------------------------------------------------------------


@dataclass
class MADSelectiveCopyingConfig:
    name: str = "mad_selective_copying"
    vocab_size: int = 16  # V: tokens to copy from [0, V-2); V-2 is blank, V-1 the copy signal
    seq_len: int = 256  # tokens per example
    num_tokens_to_copy: int = 16  # m tokens scattered among blanks, to be output in order

    def validate(self) -> None:
        if self.vocab_size < 3:
            raise TaskError(f"task.vocab_size={self.vocab_size}: must be >= 3 (blank, copy, one token)")
        if self.num_tokens_to_copy < 1:
            raise TaskError(f"task.num_tokens_to_copy={self.num_tokens_to_copy}: must be >= 1")
        if self.seq_len <= 2 * self.num_tokens_to_copy + 1:
            raise TaskError(
                f"task.seq_len={self.seq_len}: must be > 2 * num_tokens_to_copy + 1 = "
                f"{2 * self.num_tokens_to_copy + 1}"
            )


@register_task("mad_selective_copying", MADSelectiveCopyingConfig)
def generate_mad_selective_copying(cfg: MADSelectiveCopyingConfig, num_examples: int,
                                   seed: int) -> tuple[Tensor, Tensor]:
    """MAD selective copying: tokens scattered among blanks; after the copy signal, output them in order.

    Layout (MAD's): the m tokens with seq_len - 2m - 1 blanks inserted before them at uniformly drawn
    indices (so the last token always sits next to the signal), the copy token, then m blanks whose
    labels are the m tokens.
    """
    cfg.validate()
    m, L, V = cfg.num_tokens_to_copy, cfg.seq_len, cfg.vocab_size
    num_blanks = L - 2 * m - 1

    def make_block(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        tokens = torch.randint(V - 2, (n, m), generator=gen)
        # np.insert(tokens, idx, blank) with idx uniform in [0, m): blanks land before token idx
        before = torch.zeros(n, m, dtype=torch.int64).scatter_add_(
            1, torch.randint(m, (n, num_blanks), generator=gen), torch.ones(n, num_blanks, dtype=torch.int64))
        pos = torch.arange(m) + before.cumsum(dim=1)
        inputs = torch.full((n, L), V - 2).scatter_(1, pos, tokens)
        inputs[:, L - m - 1] = V - 1
        labels = torch.full((n, L), IGNORE_INDEX)
        labels[:, L - m:] = tokens
        return inputs, labels

    return generate_blocks(cfg, num_examples, seed, block_size(L + num_blanks), make_block)


# --- compression ------------------------------------------------------------------------------------


@dataclass
class CompressionConfig:
    name: str = "mad_compression"
    vocab_size: int = 16  # V: tokens from [0, V-1); V-1 is the compression token
    seq_len: int = 64  # 2m tokens: m random tokens, then m compression tokens whose labels are the m tokens

    def validate(self) -> None:
        _check_even_len(self, minimum=2)
        if self.vocab_size < 2:
            raise TaskError(f"task.vocab_size={self.vocab_size}: must be >= 2 (compression token, one token)")


@register_task("mad_compression", CompressionConfig)
def generate_compression(cfg: CompressionConfig, num_examples: int, seed: int) -> tuple[Tensor, Tensor]:
    """MAD compression, as a causal LM task: read m random tokens, then reproduce them in order.

    MAD encodes seq_len - 1 tokens and a compression token with the model and decodes them from the
    state at the compression token with an MLP (an autoencoder). The lab's models are causal LMs, so
    here seq_len = 2m: the m tokens, then m compression tokens at which the model outputs the tokens.
    MAD's L corresponds to seq_len = 2L (MAD_GRIDS does this).
    """
    cfg.validate()
    m, V = cfg.seq_len // 2, cfg.vocab_size

    def make_block(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        tokens = torch.randint(V - 1, (n, m), generator=gen)
        inputs = torch.cat([tokens, torch.full((n, m), V - 1)], dim=1)
        labels = torch.cat([torch.full((n, m), IGNORE_INDEX), tokens], dim=1)
        return inputs, labels

    return generate_blocks(cfg, num_examples, seed, block_size(cfg.seq_len), make_block)


# --- memorisation -----------------------------------------------------------------------------------


@dataclass
class MemorizationConfig:
    name: str = "mad_memorization"
    vocab_size: int = 256  # V: keys [0, (V-1)//2), values [(V-1)//2, V-1); V-1 is the insert token
    seq_len: int = 32  # seq_len / 2 (key, insert) pairs; the label at each insert is the key's value
    map_seed: int = 12345  # seed of the fixed key->value map (MAD's default seed), shared by train and test

    def validate(self) -> None:
        _check_even_len(self, minimum=2)
        if self.vocab_size < 3:
            raise TaskError(f"task.vocab_size={self.vocab_size}: must be >= 3 (insert token, a key, a value)")


def memorization_map(cfg: MemorizationConfig) -> Tensor:
    """The fixed key->value map: entry k is the value of key k; it depends on vocab_size and map_seed only."""
    num_keys = (cfg.vocab_size - 1) // 2
    gen = torch.Generator().manual_seed(cfg.map_seed)
    return num_keys + torch.randperm(cfg.vocab_size - 1 - num_keys, generator=gen)[:num_keys]


@register_task("mad_memorization", MemorizationConfig)
def generate_memorization(cfg: MemorizationConfig, num_examples: int, seed: int) -> tuple[Tensor, Tensor]:
    """MAD memorisation: recall values of a fixed key->value map that only training can teach.

    Each example is seq_len/2 (key, insert-token) pairs with keys drawn uniformly; the label at the
    insert token is the key's value. The map is the same for every example, seed and split (by design:
    the test asks facts that the training set taught).
    """
    cfg.validate()
    value_of = memorization_map(cfg)
    pairs, V = cfg.seq_len // 2, cfg.vocab_size

    def make_block(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        keys = torch.randint(len(value_of), (n, pairs), generator=gen)
        inputs = torch.stack([keys, torch.full_like(keys, V - 1)], dim=2).reshape(n, cfg.seq_len)
        labels = torch.stack([torch.full_like(keys, IGNORE_INDEX), value_of[keys]], dim=2).reshape(n, cfg.seq_len)
        return inputs, labels

    return generate_blocks(cfg, num_examples, seed, block_size(cfg.seq_len), make_block)


def _check_even_len(cfg, minimum: int) -> None:
    if cfg.seq_len < minimum or cfg.seq_len % 2:
        raise TaskError(f"task.seq_len={cfg.seq_len}: must be even and >= {minimum}")


# --- MAD's protocol: difficulty grids, training settings, score ----------------------------------------

# MAD's training settings (mad-lab MADConfig and benchmark.py) as lab overrides: width 128, two
# [attention, SwiGLU] blocks (the lab's blocks pair each mixer with an MLP: 2 blocks = MAD's 4 layers),
# batch 128, 200 epochs, AdamW + cosine, no early stopping, 1,280 test examples.
MAD_TRAINING: dict[str, Any] = {
    "model.d_model": 128,
    "model.num_layers": 2,
    "data.num_test": 1280,
    "trainer.batch_size": 128,
    "trainer.max_epochs": 200,
    "trainer.warmup_frac": 0.0,
    "trainer.early_stop_acc": 1.0,  # MAD trains every run to the end; 0.99 would save time and move scores < 1%
}

# Searched per setting; a setting's score is its best test accuracy over these.
MAD_SEARCH: dict[str, list] = {"trainer.lr": [1e-4, 5e-4, 1e-3], "trainer.weight_decay": [0.0, 0.1]}

# Per task: MAD's baseline, and the values each key takes in turn (mad-lab configs/tasks/*.yml).
# MAD's num_train_examples is the lab's data.num_train; compression lengths are doubled (see above).
_MAD_TASKS: dict[str, tuple[dict[str, Any], dict[str, list]]] = {
    "mad_in_context_recall": (
        {"task.vocab_size": 16, "task.seq_len": 128, "data.num_train": 12800},
        {"task.vocab_size": [32, 64, 128], "task.seq_len": [256, 512, 1024],
         "data.num_train": [6400, 3200, 1600, 800]},
    ),
    "mad_fuzzy_recall": (
        {"task.vocab_size": 16, "task.seq_len": 128, "data.num_train": 12800, "task.k_motif_size": 3,
         "task.v_motif_size": 3},
        {"task.vocab_size": [32, 64, 128], "task.seq_len": [256, 512, 1024],
         "data.num_train": [6400, 3200, 1600, 800]},
    ),
    "mad_noisy_recall": (
        {"task.vocab_size": 32, "task.noise_vocab_size": 16, "task.seq_len": 128, "data.num_train": 12800,
         "task.frac_noise": 0.2},
        {"task.vocab_size": [48, 80, 144], "task.seq_len": [256, 512, 1024],
         "data.num_train": [6400, 3200, 1600, 800], "task.frac_noise": [0.4, 0.6, 0.8]},
    ),
    "mad_selective_copying": (
        {"task.vocab_size": 16, "task.seq_len": 256, "task.num_tokens_to_copy": 16, "data.num_train": 12800},
        {"task.vocab_size": [32, 64, 128], "task.seq_len": [512, 1024],
         "data.num_train": [6400, 3200, 1600, 800], "task.num_tokens_to_copy": [32, 64, 96]},
    ),
    "mad_compression": (
        {"task.vocab_size": 16, "task.seq_len": 64, "data.num_train": 12800},
        {"task.vocab_size": [32, 64, 128], "task.seq_len": [128, 256, 512],
         "data.num_train": [6400, 3200, 1600, 800]},
    ),
    "mad_memorization": (
        {"task.vocab_size": 256, "task.seq_len": 32, "data.num_train": 256},
        {"task.vocab_size": [512, 1024, 2048, 4096, 8192]},
    ),
}


def _grid(task: str) -> list[dict[str, Any]]:
    baseline, changes = _MAD_TASKS[task]
    base = {"task.name": task, **baseline}
    settings = [base]
    for key, values in changes.items():
        settings += [{**base, key: value} for value in values]
    return settings


# task name -> MAD's difficulty settings, each a complete dict of overrides (baseline first).
MAD_GRIDS: dict[str, list[dict[str, Any]]] = {task: _grid(task) for task in _MAD_TASKS}


def mad_scores(runs: Iterable[tuple[dict[str, Any], float]]) -> dict[str, float]:
    """MAD scores from (flat config, test accuracy) pairs, one per run; accuracies in [0, 1].

    A run belongs to a setting of MAD_GRIDS when its flat config (dotted keys, e.g. lab.config.flatten
    of summary["config"]) agrees on every key of the setting. A setting scores the best accuracy of its
    runs (MAD's best over lr x weight decay), a task the mean over its settings, and "mean" the mean over
    the tasks. Only tasks with a run in every setting are scored.
    """
    best: dict[tuple[str, int], float] = {}
    for flat, acc in runs:
        for task, settings in MAD_GRIDS.items():
            for index, setting in enumerate(settings):
                if all(_same(flat.get(key), value) for key, value in setting.items()):
                    best[task, index] = max(best.get((task, index), -math.inf), acc)
    scores = {}
    for task, settings in MAD_GRIDS.items():
        found = [best[task, i] for i in range(len(settings)) if (task, i) in best]
        if len(found) == len(settings):
            scores[task] = sum(found) / len(found)
    if scores:
        scores["mean"] = sum(scores.values()) / len(scores)
    return scores


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b)
    return a == b
