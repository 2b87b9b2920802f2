"""The MAD tasks: layouts against MAD's definitions, train/test targets, the grids and the MAD score."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from lab.config import load_config
from lab.data import TaskDataModule
from tasks import TaskError, generate_examples
from tasks.mad import (
    MAD_GRIDS,
    MAD_SEARCH,
    MAD_TRAINING,
    CompressionConfig,
    FuzzyRecallConfig,
    InContextRecallConfig,
    MADSelectiveCopyingConfig,
    MemorizationConfig,
    NoisyRecallConfig,
    mad_scores,
    memorization_map,
)

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "tasks"


# --- in-context recall and noisy recall ---------------------------------------------------------------


def recall_pairs(cfg, inputs):
    """Per example: the list of (key, value) pairs in order, None for noise slots."""
    content = cfg.vocab_size - cfg.noise_vocab_size
    out = []
    for row in inputs.tolist():
        pairs = []
        for k, v in zip(row[0::2], row[1::2]):
            pairs.append(None if k >= content else (k, v))
        out.append(pairs)
    return out


@pytest.mark.parametrize("cfg", [InContextRecallConfig(seq_len=64), NoisyRecallConfig(seq_len=64, frac_noise=0.4)])
def test_recall_layout_and_scored_positions(cfg):
    inputs, labels = generate_examples(cfg, 300, seed=0, split="test")
    content = cfg.vocab_size - cfg.noise_vocab_size
    num_keys = content // 2
    for pairs, x, y in zip(recall_pairs(cfg, inputs), inputs.tolist(), labels.tolist()):
        value_of, scored = {}, []
        for i, pair in enumerate(pairs):
            if pair is None:
                assert all(t >= content for t in x[2 * i:2 * i + 2]) and y[2 * i] == -100
                continue
            k, v = pair
            assert 0 <= k < num_keys <= v < content
            assert value_of.setdefault(k, v) == v, "a key keeps its value within an example"
            if i < len(pairs) - 1:
                assert (y[2 * i] == v) == (k in scored), "scored exactly when the key was seen before"
            scored.append(k)
        probe_key, probe_value = pairs[-1]
        assert probe_key in scored[:-1] and y[-2] == probe_value  # the probe asks a key shown before
        assert all(label == -100 for label in y[1::2]), "values are never label positions"


def test_noise_fraction_and_vocabulary():
    cfg = NoisyRecallConfig(seq_len=128, frac_noise=0.4)
    inputs, _ = generate_examples(cfg, 500, seed=0)
    noise_slots = inputs[:, 0:-2:2] >= 16
    assert noise_slots.float().mean().item() == pytest.approx(0.4, abs=0.02)
    assert (~noise_slots).any(dim=1).all(), "at least one real pair per example"
    assert inputs.max() == 31 and inputs[:, 0:-2:2][noise_slots].min() == 16


@pytest.mark.parametrize("cfg", [InContextRecallConfig(seq_len=64), FuzzyRecallConfig(seq_len=64)])
def test_mad_trains_on_every_next_token_and_tests_the_recall_positions(cfg):
    train_inputs, train_labels = generate_examples(cfg, 200, seed=0, split="train")
    test_inputs, test_labels = generate_examples(cfg, 200, seed=0, split="test")
    for inputs, labels in ((train_inputs, train_labels), (test_inputs, test_labels)):
        scored = labels[:, :-1] != -100
        assert torch.equal(labels[:, :-1][scored], inputs[:, 1:][scored]), "labels are the next token"
    pad = cfg.vocab_size - 1 if isinstance(cfg, FuzzyRecallConfig) else -1
    assert torch.equal(train_labels[:, :-1] != -100, train_inputs[:, 1:] != pad)
    assert (test_labels != -100).sum() < (train_labels != -100).sum() / 2
    only_recall = generate_examples(replace(cfg, train_all_tokens=False), 200, seed=0, split="train")[1]
    assert (only_recall != -100).sum() < (train_labels != -100).sum()


@pytest.mark.parametrize("overrides, expected", [
    ({"seq_len": 127}, "task.seq_len=127"),
    ({"seq_len": 2}, "task.seq_len=2"),
    ({"frac_noise": 1.0}, "task.frac_noise=1.0"),
    ({"frac_noise": 0.2, "noise_vocab_size": 0}, "needs noise_vocab_size > 0"),
    ({"noise_vocab_size": 15}, "task.vocab_size=16: needs at least 2 tokens"),
    ({"noise_vocab_size": -1}, "task.noise_vocab_size=-1"),
])
def test_recall_parameter_errors(overrides, expected):
    with pytest.raises(TaskError, match=expected) as err:
        generate_examples(replace(InContextRecallConfig(), **overrides), 4, seed=0)
    assert "\n" not in str(err.value)


# --- fuzzy recall -------------------------------------------------------------------------------------


def motifs(row, num_keys, pad):
    """Split a fuzzy-recall row into [(key tokens, value tokens, start of value)], skipping the padding."""
    pairs, i = [], 0
    while row[i] == pad:
        i += 1
    while i < len(row):
        k0 = i
        while i < len(row) and row[i] < num_keys:
            i += 1
        v0 = i
        while i < len(row) and row[i] >= num_keys:
            i += 1
        pairs.append((tuple(row[k0:v0]), tuple(row[v0:i]), v0))
    return pairs


@pytest.mark.parametrize("split", ["train", "test"])
def test_fuzzy_recall_motifs(split):
    cfg = FuzzyRecallConfig(seq_len=128)
    inputs, labels = generate_examples(cfg, 300, seed=1, split=split)
    num_keys, pad = 7, 15  # keys [0, 7), values [7, 15), padding 15
    key_sizes = set()
    for x, y in zip(inputs.tolist(), labels.tolist()):
        assert x[-1] != pad
        pairs = motifs(x, num_keys, pad)
        value_of = {}
        for key, value, start in pairs[:-1]:
            assert 1 <= len(key) <= 3 and 1 <= len(value) <= 3
            assert len(set(key)) == len(key) and len(set(value)) == len(value), "motifs of distinct tokens"
            seen = key in value_of
            assert value_of.setdefault(key, value) == value, "a repeated key keeps its value"
            if split == "test":  # scored: the value tokens of a key seen before
                assert all((y[start + j - 1] == value[j]) == seen for j in range(len(value)))
            key_sizes.add(len(key))
        probe_key, probe_value, start = pairs[-1]
        assert value_of[probe_key] == probe_value, "the final probe repeats a pair shown before"
        assert y[start - 1:start - 1 + len(probe_value)] == list(probe_value)
    assert key_sizes == ({1, 2, 3} if split == "train" else {3}), "MAD: test keys are full-size motifs"


def test_fuzzy_recall_parameter_errors():
    with pytest.raises(TaskError, match="task.vocab_size=6: 2 key and 3 value tokens"):
        generate_examples(FuzzyRecallConfig(vocab_size=6), 4, seed=0)
    with pytest.raises(TaskError, match="task.seq_len=11: must be >= 2 \\* \\(k_motif_size"):
        generate_examples(FuzzyRecallConfig(seq_len=11), 4, seed=0)
    with pytest.raises(TaskError, match="task.k_motif_size=0"):
        generate_examples(FuzzyRecallConfig(k_motif_size=0), 4, seed=0)


# --- selective copying, compression, memorisation ------------------------------------------------------


def test_mad_selective_copying_layout():
    cfg = MADSelectiveCopyingConfig(vocab_size=16, seq_len=64, num_tokens_to_copy=8)
    inputs, labels = generate_examples(cfg, 1000, seed=0)
    copy_at = 64 - 8 - 1
    assert (inputs[:, copy_at] == 15).all() and (inputs[:, copy_at + 1:] == 14).all()
    region = inputs[:, :copy_at]
    tokens = region[region != 14].reshape(1000, 8)
    assert torch.equal(labels[:, copy_at + 1:], tokens) and (tokens < 14).all()
    assert not (labels[:, :copy_at + 1] != -100).any()
    # MAD inserts blanks before token indices [0, m): the last token always sits next to the copy signal
    assert (region[:, -1] != 14).all()


def test_compression_layout():
    cfg = CompressionConfig(vocab_size=16, seq_len=20)
    inputs, labels = generate_examples(cfg, 100, seed=0)
    assert (inputs[:, 10:] == 15).all() and (inputs[:, :10] < 15).all()
    assert torch.equal(labels[:, 10:], inputs[:, :10]) and not (labels[:, :10] != -100).any()
    with pytest.raises(TaskError, match="task.seq_len=7"):
        generate_examples(replace(cfg, seq_len=7), 4, seed=0)


def test_memorization_map_is_fixed_and_shared_by_train_and_test():
    cfg = MemorizationConfig()
    value_of = memorization_map(cfg)
    assert len(value_of) == 127 and len(set(value_of.tolist())) == 127  # MAD: 127 keys, distinct values
    assert ((value_of >= 127) & (value_of < 255)).all()
    for seed, split in ((0, "train"), (1, "test")):
        inputs, labels = generate_examples(cfg, 500, seed=seed, split=split)
        assert (inputs[:, 1::2] == 255).all() and (inputs[:, 0::2] < 127).all()
        assert torch.equal(labels[:, 1::2], value_of[inputs[:, 0::2]]) and not (labels[:, 0::2] != -100).any()
    assert not torch.equal(memorization_map(replace(cfg, map_seed=1)), value_of)
    with pytest.raises(TaskError, match="task.vocab_size=2"):
        generate_examples(replace(cfg, vocab_size=2), 4, seed=0)


def test_mad_selective_copying_parameter_errors():
    with pytest.raises(TaskError, match="task.seq_len=33: must be > 2 \\* num_tokens_to_copy \\+ 1 = 33"):
        generate_examples(MADSelectiveCopyingConfig(seq_len=33), 4, seed=0)


# --- grids and score ----------------------------------------------------------------------------------


def test_grids_follow_mad():
    sizes = {name: len(settings) for name, settings in MAD_GRIDS.items()}
    assert sizes == {"mad_in_context_recall": 11, "mad_fuzzy_recall": 11, "mad_noisy_recall": 14,
                     "mad_selective_copying": 13, "mad_compression": 11, "mad_memorization": 6}
    for name, settings in MAD_GRIDS.items():
        baseline = settings[0]
        assert baseline["task.name"] == name
        for setting in settings[1:]:
            assert setting.keys() == baseline.keys()
            assert sum(setting[k] != baseline[k] for k in baseline) == 1, "MAD changes one key at a time"
    assert MAD_SEARCH == {"trainer.lr": [1e-4, 5e-4, 1e-3], "trainer.weight_decay": [0.0, 0.1]}


def overrides(setting: dict) -> list[str]:
    return [f"{key}={value}" for key, value in {**MAD_TRAINING, **setting}.items()]


@pytest.mark.parametrize("name", sorted(MAD_GRIDS))
def test_every_grid_setting_is_a_valid_run(name):
    for setting in MAD_GRIDS[name]:
        run = load_config([], overrides(setting))
        TaskDataModule(run)  # validates the task, slices and positions
        assert run.data.num_train == setting["data.num_train"] if "data.num_train" in setting else True


@pytest.mark.parametrize("name", sorted(MAD_GRIDS))
def test_shipped_config_is_the_mad_baseline(name):
    run = load_config([str(CONFIGS / f"{name}.yaml")])
    flat = {f"{section}.{key}": value for section, values in yaml.safe_load(
        (CONFIGS / f"{name}.yaml").read_text()).items() if isinstance(values, dict) for key, value in values.items()}
    for key, value in {**MAD_GRIDS[name][0], **MAD_TRAINING}.items():
        assert flat[key] == value, key
    assert run.task.name == name


def test_mad_scores():
    settings = MAD_GRIDS["mad_memorization"]
    runs = []
    for i, setting in enumerate(settings):
        for lr, acc in ((1e-4, 0.1 * i), (1e-3, 0.1 * i + 0.05)):  # the best of the lr search counts
            runs.append(({**setting, "trainer.lr": lr, "model.d_model": 128}, acc))
    runs.append(({**settings[0], "task.name": "mad_compression"}, 1.0))  # incomplete task: not scored
    scores = mad_scores(runs)
    expected = sum(0.1 * i + 0.05 for i in range(len(settings))) / len(settings)
    assert scores == pytest.approx({"mad_memorization": expected, "mean": expected})
    assert mad_scores([]) == {}


def test_shipped_mad_sweep_covers_every_grid_setting():
    from pathlib import Path

    from sweeps.spec import load_sweep
    from tasks.mad import MAD_GRIDS, MAD_SEARCH

    sweep = load_sweep(str(Path(__file__).resolve().parent.parent / "configs" / "sweeps" / "mad.yaml"))
    assert list(sweep.cfg.variants.values()) == [s for settings in MAD_GRIDS.values() for s in settings]
    assert sweep.cfg.lrs == MAD_SEARCH["trainer.lr"]
    assert sweep.cfg.space["trainer.weight_decay"] == MAD_SEARCH["trainer.weight_decay"]


def test_report_mad_section_scores_complete_tasks_only():
    from lab.config import load_config, to_dict
    from sweeps.report import mad_section
    from tasks.mad import MAD_GRIDS

    def run(setting, acc, model="attention"):
        dotlist = [f"{k}={v}" for k, v in setting.items()] + [f"model.name={model}"]
        return {"config": to_dict(load_config([], dotlist)), "best_val_acc": acc}

    memorization = MAD_GRIDS["mad_memorization"]
    runs = [run(s, 0.5) for s in memorization] + [run(s, 0.9) for s in memorization[:1]]  # best of two on one
    runs += [run(s, 1.0) for s in MAD_GRIDS["mad_compression"][:1]]  # one setting only: not scored
    text = mad_section(runs)
    expected = 100 * (0.9 + 0.5 * (len(memorization) - 1)) / len(memorization)
    assert f"| attention | {expected:.1f} | {expected:.1f} |" in text and "compression" not in text
    assert mad_section([run(memorization[0], 0.5)]) == ""
    seeded = [run({**s, "model_seed": seed}, acc) for s in memorization for seed, acc in ((0, 0.3), (1, 0.7))]
    assert "| attention | 50.0 | 50.0 |" in mad_section(seeded)  # sweep.seeds: a run's seeds score their mean
