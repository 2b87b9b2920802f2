"""Synthetic tasks. Every module here except `registry` defines one task and registers it on import,
so adding a task means adding one file."""

import importlib
import pkgutil

from tasks.registry import TASKS, TaskError, TaskSpec, check_examples, get_task, register_task

__all__ = ["TASKS", "TaskError", "TaskSpec", "check_examples", "get_task", "register_task"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
