"""`lab new-task`'s template writer: the three files it writes register, list, train and pass their tests."""

import importlib
import importlib.util
import sys

import pytest

import tasks
from lab.cli import main
from tasks import TASKS, TaskError
from tasks.scaffold import new_task, task_files

NAME = "scaffolded_probe"


@pytest.fixture
def scaffolded(tmp_path):
    """new_task(NAME) under tmp_path, with tmp_path/tasks visible as part of the `tasks` package."""
    paths = new_task(NAME, tmp_path)
    tasks.__path__.append(str(tmp_path / "tasks"))
    try:
        importlib.import_module(f"tasks.{NAME}")
        yield tmp_path, paths
    finally:
        tasks.__path__.remove(str(tmp_path / "tasks"))
        TASKS.pop(NAME, None)
        sys.modules.pop(f"tasks.{NAME}", None)


def test_writes_the_three_files(tmp_path):
    paths = new_task("my_task", tmp_path)
    assert paths == task_files("my_task", tmp_path) == [
        tmp_path / "tasks" / "my_task.py", tmp_path / "configs" / "tasks" / "my_task.yaml",
        tmp_path / "tests" / "test_task_my_task.py"]
    assert all(p.is_file() for p in paths)
    assert "class MyTaskConfig:" in paths[0].read_text()
    assert "name: my_task" in paths[1].read_text()


def test_scaffolded_task_lists_trains_and_passes_its_tests(scaffolded, capsys):
    root, paths = scaffolded
    assert main(["tasks"]) == 0
    assert f"task.name={NAME}: Recall the first token" in capsys.readouterr().out
    spec = importlib.util.spec_from_file_location(f"test_task_{NAME}", paths[2])
    generated_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated_tests)
    generated_tests.test_generator_invariants()
    generated_tests.test_bad_parameters_are_one_line_errors()
    generated_tests.test_a_small_model_learns_it(root / "runs")  # trains from the generated config


@pytest.mark.parametrize("name, message", [
    ("Bad-Name", "must be a lower-case Python identifier"),
    ("1task", "must be a lower-case Python identifier"),
    ("class", "must be a lower-case Python identifier"),
    ("registry", "must be a lower-case Python identifier"),
    ("", "must be a lower-case Python identifier"),
    ("mqar", "task name 'mqar': a task of that name is already registered (in tasks.mqar)"),
])
def test_bad_names_are_refused(tmp_path, name, message):
    with pytest.raises(TaskError) as err:
        new_task(name, tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not any(tmp_path.iterdir()), "nothing is written"


def test_existing_files_are_never_overwritten(tmp_path):
    config = tmp_path / "configs" / "tasks" / "my_task.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("mine")
    with pytest.raises(TaskError, match="my_task.yaml already exists; nothing written"):
        new_task("my_task", tmp_path)
    assert config.read_text() == "mine" and not (tmp_path / "tasks").exists()


def test_the_walkthrough_example_works(tmp_path):
    # docs/adding-a-task.md's task, imported as written: it registers, validates and generates well-formed data.
    from pathlib import Path

    import torch

    from tasks import generate_examples

    doc = (Path(__file__).resolve().parent.parent / "docs" / "adding-a-task.md").read_text()
    source = tmp_path / "lookback.py"
    source.write_text(doc.split("```python\n# tasks/lookback.py\n", 1)[1].split("```", 1)[0])
    spec = importlib.util.spec_from_file_location("tasks.lookback_docs_example", source)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        inputs, labels = generate_examples(module.LookbackConfig(), 100, seed=0)
        assert torch.equal(labels[:, 3:], inputs[:, :-3]) and (labels[:, :3] == -100).all()
        with pytest.raises(TaskError, match="task.offset=0"):
            module.generate(module.LookbackConfig(offset=0), 4, seed=0)
    finally:
        TASKS.pop("lookback", None)


def test_cli_refuses_a_taken_name_in_one_line(capsys):
    assert main(["new-task", "mqar"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: task name 'mqar': a task of that name is already registered") and err.count("\n") == 1
