"""Config loading: YAML + key=value merge, typed per model and task, one-line errors with exit code 2."""

import pytest

from lab.cli import main
from lab.config import flatten, load_config, task_slices, to_dict
from lab.errors import LabError


def test_defaults_and_overrides_merge(tmp_path):
    yaml_file = tmp_path / "base.yaml"
    yaml_file.write_text("model:\n  name: gka\n  d_model: 32\ntask:\n  seq_len: 32\ntrainer:\n  lr: 0.01\n")
    run = load_config([str(yaml_file)], ["model.num_iter=5", "trainer.lr=0.002", "model.gating=false"])
    assert type(run.model).__name__ == "GKAConfig"
    assert (run.model.d_model, run.model.num_iter, run.model.gating) == (32, 5, False)
    assert run.trainer.lr == 0.002  # the command line wins over the file
    assert run.task.seq_len == 32 and run.task.num_kv_pairs == 4  # untouched keys keep their defaults
    flat = flatten(to_dict(run))
    assert flat["model.num_iter"] == 5 and flat["task.name"] == "mqar"


def test_overrides_leave_the_next_configs_defaults_alone():
    """The typed defaults are built once per model and task: a run's overrides must not reach the next run."""
    first = load_config([], ["model.name=gka", "model.d_model=24", "task.seq_len=48", "trainer.lr=0.5"])
    second = load_config([], ["model.name=gka"])
    assert (first.model.d_model, first.task.seq_len, first.trainer.lr) == (24, 48, 0.5)
    assert (second.model.d_model, second.task.seq_len, second.trainer.lr) != (24, 48, 0.5)
    assert second == load_config([], ["model.name=gka", f"model.d_model={second.model.d_model}"])


def test_later_config_file_wins(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("seed: 1\nmodel:\n  d_model: 32\n")
    second.write_text("seed: 2\n")
    run = load_config([str(first), str(second)], [])
    assert (run.seed, run.model.d_model) == (2, 32)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.nmu_iter=3", "model.name=gka"], "unknown config key 'model.nmu_iter'"),
        (["trainer.lrr=1"], "unknown config key 'trainer.lrr'"),
        (["model.d_model=big"], "model.d_model"),
        (["model.name=transformerxl"], "model.name='transformerxl': unknown model; available: attention, gka"),
        (["task.name=nope"], "unknown task 'nope'"),
        (["model.name=gka", "model.solver=newton"], "model.solver='newton': allowed values are chebyshev, cg, exact"),
        (["model.name=gka", "model.num_iter=-1"], "model.num_iter=-1: must be >= 0"),
        (["task.num_kv_pairs=20", "task.seq_len=64"], "num_kv_pairs"),
        (["trainer.precision=fp8"], "trainer.precision='fp8'"),
        (["model.num_iter=3"], "unknown config key 'model.num_iter'"),  # attention has no solver
        (["run_name=a/b"], "run_name='a/b'"),
        (["seed"], "overrides are key=value"),
        (["data.test_slices=abc"], "data.test_slices: must be a list (data.test_slices=[a,b] on"),
    ],
)
def test_bad_config_is_one_clear_line(overrides, message):
    with pytest.raises(LabError) as err:
        load_config([], overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_exit_code_2_and_one_line_on_stderr(capsys, tmp_path):
    code = main(["train", "model.name=gka", "model.sovler=cg", f"runs_dir={tmp_path}"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: unknown config key 'model.sovler'")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert not any(tmp_path.iterdir())  # nothing written for a rejected config


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(LabError, match="no such file"):
        load_config([str(tmp_path / "missing.yaml")], [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(LabError, match="not valid YAML"):
        load_config([str(bad)], [])


def test_slices_are_typed_task_configs():
    run = load_config([], ["data.test_slices=[{seq_len: 64, num_kv_pairs: 4}, {seq_len: 128, num_kv_pairs: 8}]"])
    slices = task_slices(run, "test")
    assert [(s.seq_len, s.num_kv_pairs) for s in slices] == [(64, 4), (128, 8)]
    assert task_slices(run, "train") == [run.task]
    run = load_config([], ["data.test_slices=[{seq_lne: 64}]"])
    with pytest.raises(LabError, match=r"data.test_slices\[0\].seq_lne"):
        task_slices(run, "test")
    run = load_config([], ["data.test_slices=[{seq_len: 64, num_kv_pairs: 40}]"])
    with pytest.raises(LabError, match="num_kv_pairs"):
        task_slices(run, "test")


def test_cli_overrides_on_both_sides_of_config(tmp_path, capsys):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("model:\n  name: gka\n")
    second.write_text("seed: 3\n")
    code = main(["train", "--config", str(first), "model.num_iter=2", "--config", str(second), "model.sovler=cg"])
    assert code == 2
    assert "unknown config key 'model.sovler'" in capsys.readouterr().err


def test_listing_commands_show_every_key(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(key in out for key in ("model.name=gka", "model.num_iter", "model.ridge_mode", "model.d_state"))
    assert main(["tasks"]) == 0
    assert "task.num_kv_pairs" in capsys.readouterr().out
