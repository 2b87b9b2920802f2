"""What every registered task must satisfy, and each new task's own invariants and parameter errors.

(MQAR's own tests are in test_mqar.py, MAD's grids and score in test_tasks_mad.py, learning in
test_tasks_learning.py.)
"""

import time
from dataclasses import replace

import pytest
import torch

from lab.data import data_seed
from tasks import TASKS, TaskError, check_examples, generate_examples, get_task
from tasks.associative_recall import AssociativeRecallConfig, generate_associative_recall
from tasks.forgetting_mqar import ForgettingMQARConfig, generate_forgetting_mqar
from tasks.induction_heads import InductionHeadsConfig, generate_induction_heads
from tasks.selective_copying import SelectiveCopyingConfig, generate_selective_copying

pytestmark = pytest.mark.usefixtures("single_thread")

ALL_TASKS = sorted(TASKS)


def small(name: str):
    """The task's default config, shortened where the default is long (keeps these tests quick)."""
    cfg = get_task(name).config_cls()
    shorter = {"induction_heads": {"seq_len": 64}, "selective_copying": {"seq_len": 64},
               "mad_selective_copying": {"seq_len": 64}}
    return replace(cfg, **shorter.get(name, {}))


# --- every task ------------------------------------------------------------------------------------


def test_the_suite_is_registered():
    expected = {"mqar", "forgetting_mqar", "associative_recall", "induction_heads", "selective_copying",
                "mad_in_context_recall", "mad_noisy_recall", "mad_fuzzy_recall", "mad_selective_copying",
                "mad_compression", "mad_memorization"}
    assert expected <= set(TASKS)
    for spec in TASKS.values():
        assert spec.description and spec.description[0].isupper(), spec.name
        assert spec.config_cls().name == spec.name


@pytest.mark.parametrize("name", ALL_TASKS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_output_is_well_formed_and_seeded(name, split):
    cfg = small(name)
    inputs, labels = generate_examples(cfg, 300, seed=3, split=split)  # checks shapes, dtypes, ranges
    assert inputs.shape == (300, cfg.seq_len)
    again = generate_examples(cfg, 300, seed=3, split=split)
    other = generate_examples(cfg, 300, seed=4, split=split)
    assert torch.equal(inputs, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(inputs, other[0])


@pytest.mark.parametrize("name", ALL_TASKS)
def test_test_examples_are_not_training_examples(name):
    # The lab draws train and test sets from different seeds; no task may make them collide (MAD checks
    # this too). mad_memorization shares its key->value map across splits by design, not its sequences.
    cfg = small(name)
    train_inputs, _ = generate_examples(cfg, 2000, data_seed(0, 0, "train"), "train")
    test_inputs, _ = generate_examples(cfg, 500, data_seed(0, 0, "test"), "test")
    train_rows = {tuple(row) for row in train_inputs.tolist()}
    assert not any(tuple(row) in train_rows for row in test_inputs.tolist())


@pytest.mark.parametrize("name", ALL_TASKS)
def test_bad_num_examples_and_split(name):
    cfg = small(name)
    with pytest.raises(TaskError, match="num_examples=0"):
        generate_examples(cfg, 0, seed=0)
    with pytest.raises(TaskError, match="split='val'"):
        generate_examples(cfg, 4, seed=0, split="val")


@pytest.mark.parametrize("name", ALL_TASKS)
def test_generation_is_fast(name):
    cfg = small(name)
    start = time.perf_counter()
    generate_examples(cfg, 20_000, seed=0)
    assert time.perf_counter() - start < 3.0  # 100k examples in seconds: vectorised, not a loop per example


def test_bad_generator_output_is_caught_before_training():
    cfg = InductionHeadsConfig(seq_len=8)
    inputs, labels = generate_induction_heads(cfg, 4, seed=0)
    with pytest.raises(TaskError, match="labels has shape"):
        check_examples(cfg, inputs, labels[:, :-1])
    with pytest.raises(TaskError, match=r"labels\[0, 7\]=16 is neither -100 nor in \[0, vocab_size=16\)"):
        check_examples(cfg, inputs, labels.index_fill(1, torch.tensor([7]), 16))
    with pytest.raises(TaskError, match="example 0 has no supervised label"):
        check_examples(cfg, inputs, torch.full_like(labels, -100))


# --- forgetting MQAR --------------------------------------------------------------------------------


def test_forgetting_mqar_last_value_wins():
    cfg = ForgettingMQARConfig(vocab_size=256, seq_len=64, num_kv_pairs=6, num_updates=3, random_non_queries=False)
    inputs, labels = generate_forgetting_mqar(cfg, 300, seed=0)
    context = 2 * (cfg.num_kv_pairs + cfg.num_updates)
    changed = 0
    for x, y in zip(inputs.tolist(), labels.tolist()):
        first, last = {}, {}
        for k, v in zip(x[0:context:2], x[1:context:2]):
            first.setdefault(k, v)
            last[k] = v
        assert len(first) == cfg.num_kv_pairs
        updated = [k for k in first if first[k] != last[k]]
        assert len(updated) == cfg.num_updates  # an update always changes the value
        # every key is queried once after the context; its label is the last value
        queried = {x[t]: y[t] for t in range(context, cfg.seq_len) if y[t] != -100}
        assert queried == last
        changed += len(updated)
    assert changed == 300 * cfg.num_updates
    assert not (labels[:, :context] != -100).any()


def test_forgetting_mqar_updates_are_in_random_order_of_random_keys():
    cfg = ForgettingMQARConfig(vocab_size=256, seq_len=64, num_kv_pairs=4, num_updates=1)
    inputs, _ = generate_forgetting_mqar(cfg, 4000, seed=0)
    updated_key = inputs[:, 8]
    slot = (inputs[:, 0:8:2] == updated_key[:, None]).int().argmax(dim=1)
    freq = torch.bincount(slot, minlength=4) / 4000
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.03)


@pytest.mark.parametrize("overrides, expected", [
    ({"num_updates": 5}, "task.num_updates=5"),
    ({"num_updates": -1}, "task.num_updates=-1"),
    ({"num_kv_pairs": 12, "num_updates": 10}, "task.seq_len=64: needs .* = 68 tokens"),
    ({"seq_len": 63}, "task.seq_len=63"),
    ({"vocab_size": 64}, "task.vocab_size=64"),
    ({"power_a": 0.0}, "task.power_a=0.0"),
    ({"num_kv_pairs": 0}, "task.num_kv_pairs=0"),
])
def test_forgetting_mqar_parameter_errors(overrides, expected):
    cfg = replace(ForgettingMQARConfig(num_kv_pairs=4, num_updates=2), **overrides)
    with pytest.raises(TaskError, match=expected) as err:
        generate_forgetting_mqar(cfg, 4, seed=0)
    assert "\n" not in str(err.value)


# --- associative recall ------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len, num_kv_pairs", [(31, 0), (32, 0), (31, 5)])
def test_associative_recall_layout(seq_len, num_kv_pairs):
    cfg = AssociativeRecallConfig(vocab_size=80, seq_len=seq_len, num_kv_pairs=num_kv_pairs)
    inputs, labels = generate_associative_recall(cfg, 500, seed=0)
    N = cfg.pairs()
    pad = seq_len - 2 * N - 1
    assert (inputs[:, :pad] == 0).all()
    keys, values = inputs[:, pad:-1:2], inputs[:, pad + 1:-1:2]
    assert ((keys >= 1) & (keys < 40)).all() and ((values >= 40) & (values < 80)).all()
    assert all(len(set(row)) == N for row in keys.tolist()), "keys repeat within an example"
    assert not (labels[:, :-1] != -100).any()
    hit = keys == inputs[:, -1:]
    assert (hit.sum(dim=1) == 1).all(), "the query is one of the example's keys"
    assert torch.equal(labels[:, -1], values[hit])


@pytest.mark.parametrize("overrides, expected", [
    ({"seq_len": 2}, "task.seq_len=2"),
    ({"num_kv_pairs": 16}, "task.seq_len=31"),
    ({"num_kv_pairs": -1}, "task.num_kv_pairs=-1"),
    ({"vocab_size": 20}, "task.vocab_size=20: only 9 distinct keys"),
])
def test_associative_recall_parameter_errors(overrides, expected):
    with pytest.raises(TaskError, match=expected):
        generate_associative_recall(replace(AssociativeRecallConfig(), **overrides), 4, seed=0)


# --- induction heads ---------------------------------------------------------------------------------


def test_induction_heads_layout():
    cfg = InductionHeadsConfig(vocab_size=16, seq_len=32)
    inputs, labels = generate_induction_heads(cfg, 2000, seed=0)
    trigger = inputs == 15
    assert (trigger.sum(dim=1) == 2).all() and trigger[:, -1].all()
    first = trigger.int().argmax(dim=1)
    assert (first <= 29).all() and first.min() == 0 and first.max() == 29  # uniform over [0, L-3]
    assert torch.equal(labels[:, -1], inputs.gather(1, first[:, None] + 1)[:, 0])
    assert not (labels[:, :-1] != -100).any()
    assert (labels[:, -1] < 15).all()


@pytest.mark.parametrize("overrides, expected", [
    ({"seq_len": 2}, "task.seq_len=2"), ({"vocab_size": 1}, "task.vocab_size=1")])
def test_induction_heads_parameter_errors(overrides, expected):
    with pytest.raises(TaskError, match=expected):
        generate_induction_heads(replace(InductionHeadsConfig(), **overrides), 4, seed=0)


# --- selective copying (Mamba) -----------------------------------------------------------------------


def test_selective_copying_layout():
    cfg = SelectiveCopyingConfig(vocab_size=16, seq_len=48, num_tokens_to_copy=6)
    inputs, labels = generate_selective_copying(cfg, 2000, seed=0)
    span = 48 - 6
    assert (inputs[:, span:] == 15).all()
    tokens = inputs[:, :span]
    assert ((tokens == 0).sum(dim=1) == span - 6).all()
    copied = tokens[tokens != 0].reshape(2000, 6)  # in order of position
    assert torch.equal(labels[:, span:], copied)
    assert ((copied >= 1) & (copied < 15)).all()
    assert not (labels[:, :span] != -100).any()
    # positions are a uniform subset of the whole span: every position, the last one included, is used
    occupied = (tokens != 0).float().mean(dim=0)
    assert torch.allclose(occupied, torch.full((span,), 6 / span), atol=0.04)


@pytest.mark.parametrize("overrides, expected", [
    ({"seq_len": 31}, "task.seq_len=31"), ({"num_tokens_to_copy": 0}, "task.num_tokens_to_copy=0"),
    ({"vocab_size": 2}, "task.vocab_size=2")])
def test_selective_copying_parameter_errors(overrides, expected):
    with pytest.raises(TaskError, match=expected):
        generate_selective_copying(replace(SelectiveCopyingConfig(seq_len=32), **overrides), 4, seed=0)
