"""Helpers the task generators share: seeded block-wise generation on one thread, and samplers.

(A leading underscore keeps `tasks/__init__.py` from importing this as a task module.)
"""

from collections.abc import Callable

import torch
from torch import Tensor

from tasks.registry import TaskError


def generate_blocks(cfg, num_examples: int, seed: int, block: int,
                    make_block: Callable[[int, torch.Generator], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Call `make_block(n, gen)` for blocks of at most `block` examples and stack the results.

    Blocks bound the memory of the per-example work tensors; one generator continues across blocks, so
    the data depend on the seed alone (and on `block`, which generators keep fixed).
    """
    if num_examples < 1:
        raise TaskError(f"num_examples={num_examples}: must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    # Generation is many small ops: handing each to a second core that another process (a training run,
    # a sweep worker) holds stalls ~10 ms per op. One thread costs little on an idle machine.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inputs = torch.empty(num_examples, cfg.seq_len, dtype=torch.int64)
        labels = torch.empty_like(inputs)
        for start in range(0, num_examples, block):
            stop = min(start + block, num_examples)
            inputs[start:stop], labels[start:stop] = make_block(stop - start, gen)
    finally:
        torch.set_num_threads(num_threads)
    return inputs, labels


def block_size(work_per_example: int, budget: int = 1 << 22) -> int:
    """Examples per block so that a block's largest work tensor holds about `budget` elements."""
    return max(1, min(4096, budget // max(1, work_per_example)))


def random_distinct(shape: tuple[int, ...], count: int, size: int, gen: torch.Generator) -> Tensor:
    """`count` distinct integers from [0, size) per leading index, uniform over ordered draws."""
    # argsort of uniform noise is a uniform permutation; its first `count` entries are ordered draws
    # without replacement (what numpy's choice(size, count, replace=False) gives).
    return torch.rand(*shape, size, generator=gen).argsort(dim=-1)[..., :count]


def random_positions(rows: int, count: int, size: int, gen: torch.Generator) -> Tensor:
    """Per row, `count` distinct sorted positions in [0, size): a uniform random subset."""
    return random_distinct((rows,), count, size, gen).sort(dim=1).values


def first_occurrence(ids: Tensor) -> tuple[Tensor, Tensor]:
    """For `ids` [rows, n]: (index of the first equal id in the row, whether this is that first one).

    A stable sort groups equal ids in order of appearance, so each group's first sorted element is the
    id's first occurrence; a running max carries its index along the group.
    """
    rows, n = ids.shape
    order = ids.argsort(dim=1, stable=True)
    sorted_ids = ids.gather(1, order)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    start_index = torch.where(starts, torch.arange(n).expand(rows, n), 0).cummax(dim=1).values
    first_sorted = order.gather(1, start_index)  # original position of each group's first member
    first = torch.empty_like(order).scatter_(1, order, first_sorted)
    return first, first == torch.arange(n)
