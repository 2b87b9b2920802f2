"""Synthetic tasks. Every module here registers its task(s) on import (`registry` and `scaffold` register
none), so adding a task means adding one file; `lab new-task NAME` writes that file from a template."""

import importlib
import pkgutil

from tasks.registry import (
    IGNORE_INDEX,
    TASKS,
    TaskError,
    TaskSpec,
    check_examples,
    generate_examples,
    get_task,
    register_task,
)

__all__ = ["IGNORE_INDEX", "TASKS", "TaskError", "TaskSpec", "check_examples", "generate_examples", "get_task",
           "register_task"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
