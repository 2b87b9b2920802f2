import time
from dataclasses import dataclass, replace

import pytest
import torch

from tasks import TASKS, TaskError, check_examples, get_task, register_task
from tasks.mqar import BLOCK, MQARConfig, generate_mqar

V, L, N = 512, 64, 8
C = 2 * N  # context length for one pass


def make(num_examples=256, seed=0, **overrides):
    cfg = MQARConfig(**{"vocab_size": V, "seq_len": L, "num_kv_pairs": N, **overrides})
    inputs, labels = generate_mqar(cfg, num_examples, seed)
    return cfg, inputs, labels


def query_gaps(inputs, labels, context_len):
    """Gap (offset / 2 in the query region) of each supervised position, as [num_examples, N]."""
    _, pos = (labels != -100).nonzero(as_tuple=True)
    return ((pos - context_len) // 2).reshape(len(inputs), -1)


# --- layout -----------------------------------------------------------------------------------------


def test_shapes_and_dtypes():
    cfg, inputs, labels = make(num_examples=10)
    assert inputs.shape == labels.shape == (10, L)
    assert inputs.dtype == labels.dtype == torch.int64
    check_examples(cfg, inputs, labels)


def test_context_is_key_value_pairs():
    _, inputs, _ = make()
    keys, values = inputs[:, 0:C:2], inputs[:, 1:C:2]
    assert ((keys >= 1) & (keys < V // 2)).all()
    assert ((values >= V // 2) & (values < V)).all()
    assert all(len(set(row.tolist())) == N for row in keys), "keys repeat within an example"


def test_every_context_slot_is_uniform():
    # 16 keys for 8 slots: a sampler that fills slots in a biased order shows up in the slot means.
    cfg = MQARConfig(vocab_size=34, seq_len=32, num_kv_pairs=8)
    inputs, _ = generate_mqar(cfg, 4000, seed=0)
    key_means = inputs[:, 0:16:2].double().mean(dim=0)
    value_means = inputs[:, 1:16:2].double().mean(dim=0)
    assert torch.allclose(key_means, torch.full((8,), (1 + 16) / 2, dtype=torch.float64), atol=0.3)
    assert torch.allclose(value_means, torch.full((8,), (17 + 33) / 2, dtype=torch.float64), atol=0.3)


def test_each_key_queried_once_with_its_value():
    _, inputs, labels = make(random_non_queries=False)
    for x, y in zip(inputs, labels):
        value_of = dict(zip(x[0:C:2].tolist(), x[1:C:2].tolist()))
        query_region = x[C:].tolist()
        for key, value in value_of.items():
            assert query_region.count(key) == 1
            pos = C + query_region.index(key)
            assert y[pos].item() == value


def test_labels_only_at_queries():
    _, inputs, labels = make()
    supervised = labels != -100
    assert (supervised.sum(dim=1) == N).all()
    assert not supervised[:, :C].any(), "no label inside the context"
    rows, pos = supervised.nonzero(as_tuple=True)
    assert ((pos - C) % 2 == 0).all(), "queries sit at even offsets 2*gap of the query region"
    # Under a label sits a key of the same example; the label is a value token.
    assert ((inputs[rows, pos] >= 1) & (inputs[rows, pos] < V // 2)).all()
    assert ((labels[rows, pos] >= V // 2) & (labels[rows, pos] < V)).all()


def test_random_filler_spans_whole_vocab():
    _, inputs, labels = make(num_examples=512)
    filler = inputs[:, C:][labels[:, C:] == -100]
    assert filler.min() < 8 and filler.max() >= V - 8, "filler should be uniform over [0, V)"
    assert (filler < V // 2).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_zero_filler_without_random_non_queries():
    _, inputs, labels = make(random_non_queries=False)
    filler = inputs[:, C:][labels[:, C:] == -100]
    assert (filler == 0).all()
    assert (inputs[:, :C] != 0).all()


def test_num_passes_repeats_context():
    cfg, inputs, labels = make(num_passes=2, random_non_queries=False)
    assert torch.equal(inputs[:, :C], inputs[:, C : 2 * C])
    assert not (labels[:, : 2 * C] != -100).any()
    gaps = query_gaps(inputs, labels, 2 * C)
    assert gaps.min() >= 0 and gaps.max() < (L - 2 * C) // 2
    check_examples(cfg, inputs, labels)


# --- query-gap power law ----------------------------------------------------------------------------


def test_power_law_front_loads_queries():
    kwargs = {"num_examples": 2000, "seq_len": 256, "num_kv_pairs": 4}
    space = (256 - 8) // 2
    gaps = {a: query_gaps(*make(power_a=a, **kwargs)[1:], context_len=8).float() for a in (0.01, 1.0)}
    # power_a=1 is uniform over range(space); power_a=0.01 crowds the front.
    assert gaps[1.0].mean().item() == pytest.approx((space - 1) / 2, rel=0.05)
    assert gaps[0.01].mean().item() < 0.6 * gaps[1.0].mean().item()
    assert (gaps[0.01] == 0).any(dim=1).float().mean() > 5 * (gaps[1.0] == 0).any(dim=1).float().mean()


def test_single_query_gap_follows_power_law():
    # With one pair the gap is a single weighted draw: p(gap) ~ (gap + 1) ** (power_a - 1).
    a, seq_len, n = 0.3, 20, 20_000
    space = (seq_len - 2) // 2
    cfg = MQARConfig(vocab_size=V, seq_len=seq_len, num_kv_pairs=1, power_a=a)
    inputs, labels = generate_mqar(cfg, n, seed=1)
    freq = torch.bincount(query_gaps(inputs, labels, 2).flatten(), minlength=space) / n
    p = torch.arange(1, space + 1, dtype=torch.float64) ** (a - 1)
    assert torch.allclose(freq.double(), p / p.sum(), atol=0.015)


def test_query_order_is_random_but_follows_context_order_like_zoology():
    def gap_of_context_key(power_a):
        _, inputs, _ = make(num_examples=2000, power_a=power_a, num_kv_pairs=4, random_non_queries=False)
        keys = inputs[:, 0:8:2]
        # Offset of each context key inside the query region (each occurs there exactly once).
        return torch.stack([(inputs[:, 8:] == keys[:, i : i + 1]).int().argmax(dim=1) for i in range(4)], 1)

    uniform = gap_of_context_key(1.0)
    in_context_order = (uniform.diff(dim=1) > 0).all(dim=1).float().mean().item()
    assert in_context_order == pytest.approx(1 / 24, abs=0.02)  # any of the 4! orders
    # Zoology gives the i-th context key the i-th sequentially drawn gap, and with a front-loaded
    # power law earlier draws land earlier: the first key is asked sooner on average than the last.
    front_loaded = gap_of_context_key(0.01).float().mean(dim=0)
    assert front_loaded[0] < 0.8 * front_loaded[3]


# --- determinism ------------------------------------------------------------------------------------


def test_same_seed_same_data_different_seed_different_data():
    _, x0, y0 = make(seed=0)
    _, x0b, y0b = make(seed=0)
    _, x1, y1 = make(seed=1)
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)
    assert not torch.equal(x0, x1) and not torch.equal(y0, y1)


def test_blocks_are_not_repeats():
    # More examples than one generation block: later blocks must continue the random stream.
    cfg = MQARConfig(vocab_size=V, seq_len=L, num_kv_pairs=N)
    inputs, _ = generate_mqar(cfg, BLOCK + 10, seed=0)
    assert not torch.equal(inputs[:10], inputs[BLOCK:])


# --- parameter errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"num_kv_pairs": 20}, "task.num_kv_pairs=20"),  # 4N > L
        ({"num_kv_pairs": 11, "num_passes": 2}, "task.num_kv_pairs=11"),  # context 44 + queries 22 > 64
        ({"seq_len": 63}, "task.seq_len=63"),
        ({"seq_len": 0}, "task.seq_len=0"),
        ({"vocab_size": 64}, "task.vocab_size=64"),  # V <= L
        ({"vocab_size": 10, "num_kv_pairs": 8}, "task.num_kv_pairs=8"),  # only 4 keys in [1, 5)
        ({"num_kv_pairs": 0}, "task.num_kv_pairs=0"),
        ({"power_a": 0.0}, "task.power_a=0.0"),
        ({"power_a": 1.5}, "task.power_a=1.5"),
        ({"num_passes": 0}, "task.num_passes=0"),
    ],
)
def test_impossible_parameters_name_the_parameter(overrides, expected):
    cfg = replace(MQARConfig(), **overrides)
    with pytest.raises(TaskError) as err:
        generate_mqar(cfg, 4, seed=0)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_largest_valid_configs_generate():
    for cfg in (MQARConfig(seq_len=64, num_kv_pairs=16), MQARConfig(seq_len=60, num_kv_pairs=10, num_passes=2)):
        check_examples(cfg, *generate_mqar(cfg, 8, seed=0))


def test_unknown_task_lists_available():
    with pytest.raises(TaskError, match=r"unknown task 'nope'; available: .*mqar"):
        get_task("nope")


# --- registry ---------------------------------------------------------------------------------------


def test_registry_entry():
    spec = get_task("mqar")
    assert spec.config_cls is MQARConfig and spec.generate is generate_mqar
    assert spec.description == generate_mqar.__doc__.strip().split("\n")[0]
    assert MQARConfig().name == "mqar"


@dataclass
class ToyConfig:
    name: str = "toy"
    vocab_size: int = 4
    seq_len: int = 2

    def validate(self):
        pass


def test_register_a_new_task():
    try:

        @register_task("toy", ToyConfig)
        def generate_toy(cfg, num_examples, seed):
            """Copy the first token.

            More detail that the listing leaves out."""

        assert get_task("toy").description == "Copy the first token."
        assert get_task("toy").generate is generate_toy
    finally:
        TASKS.pop("toy", None)


def test_register_rejects_a_second_module_with_the_same_name():
    @dataclass
    class OtherMQARConfig(ToyConfig):
        name: str = "mqar"

    with pytest.raises(TaskError, match="task 'mqar' is registered twice"):

        @register_task("mqar", OtherMQARConfig)
        def generate_other(cfg, num_examples, seed):
            """Another mqar."""

    assert get_task("mqar").generate is generate_mqar


def test_register_rejects_config_without_required_fields():
    @dataclass
    class NoVocab:
        name: str = "broken"
        seq_len: int = 8

        def validate(self):
            pass

    with pytest.raises(TaskError, match="vocab_size"):
        register_task("broken", NoVocab)
    assert "broken" not in TASKS


# --- check_examples ---------------------------------------------------------------------------------


@pytest.fixture
def good():
    return make(num_examples=4)


def test_check_examples_wrong_shape(good):
    cfg, inputs, labels = good
    with pytest.raises(TaskError, match=r"task 'mqar': inputs has shape \[4, 63\]"):
        check_examples(cfg, inputs[:, :-1], labels[:, :-1])


def test_check_examples_wrong_dtype(good):
    cfg, inputs, labels = good
    with pytest.raises(TaskError, match="labels has dtype torch.int32"):
        check_examples(cfg, inputs, labels.int())


def test_check_examples_input_out_of_vocab(good):
    cfg, inputs, labels = good
    inputs[2, 5] = V
    with pytest.raises(TaskError, match=rf"inputs\[2, 5\]={V} is outside"):
        check_examples(cfg, inputs, labels)


def test_check_examples_label_out_of_vocab(good):
    cfg, inputs, labels = good
    labels[1, 3] = V + 7
    with pytest.raises(TaskError, match=rf"labels\[1, 3\]={V + 7}"):
        check_examples(cfg, inputs, labels)


def test_check_examples_example_without_supervision(good):
    cfg, inputs, labels = good
    labels[3] = -100
    with pytest.raises(TaskError, match="example 3 has no supervised label"):
        check_examples(cfg, inputs, labels)


# --- speed ------------------------------------------------------------------------------------------


def test_speed_smoke():
    cfg = MQARConfig(seq_len=256, num_kv_pairs=16, vocab_size=8192)
    start = time.perf_counter()
    generate_mqar(cfg, 20_000, seed=0)
    assert time.perf_counter() - start < 5.0
