"""The tasks installed, found through Python entry points of the group ``dicom_node.tasks``.

Each entry point names a :class:`~dicom_node.ai_tasks.interface.Task` subclass, under the task's name::

    [project.entry-points."dicom_node.tasks"]
    fracture = "fracture_task:FractureTask"

The node's own tasks are the entry points of the ``dicom-node`` distribution; they run when config.yaml lists
no tasks. A site's task runs once it is installed and listed under ``inference.tasks``.
"""

from __future__ import annotations

import functools
import re
from importlib.metadata import EntryPoint, entry_points

from dicom_node.ai_tasks.interface import Task

ENTRY_POINT_GROUP = "dicom_node.tasks"
NODE_DISTRIBUTION = "dicom-node"
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")  # fits InferenceResult.task and a Procrastinate queue name


class TaskRegistryError(Exception):
    """An installed task cannot be used; the message names its entry point and the problem."""


@functools.cache
def installed_tasks() -> dict[str, type[Task]]:
    """Every installed task by name, the node's own first (in the order of its entry points)."""
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda point: _distribution(point) != NODE_DISTRIBUTION)
    tasks: dict[str, type[Task]] = {}
    series: dict[int, str] = {}
    for point in found:
        task = _load(point)
        if task.name in tasks:
            raise TaskRegistryError(f"entry point {point.value}: a task named {task.name!r} is installed twice")
        for number in task.series_numbers.values():
            if number in series:
                raise TaskRegistryError(f"entry point {point.value}: series number {number} is {series[number]}'s")
            series[number] = task.name
        tasks[task.name] = task
    return tasks


@functools.cache
def node_tasks() -> tuple[str, ...]:
    """The names of the node's own tasks: those that run when config.yaml lists none."""
    return tuple(
        point.name for point in entry_points(group=ENTRY_POINT_GROUP) if _distribution(point) == NODE_DISTRIBUTION
    )


def task_type(name: str) -> type[Task]:
    """The installed task ``name``; ValueError naming the installed ones otherwise."""
    task = installed_tasks().get(name)
    if task is None:
        raise ValueError(f"no task {name!r} is installed (installed: {', '.join(installed_tasks()) or 'none'})")
    return task


def _load(point: EntryPoint) -> type[Task]:
    try:
        task = point.load()
    except Exception as error:
        raise TaskRegistryError(f"entry point {point.value}: cannot load: {type(error).__name__}: {error}") from None
    if not (isinstance(task, type) and issubclass(task, Task)):
        raise TaskRegistryError(f"entry point {point.value}: not a subclass of dicom_node.ai_tasks.interface.Task")
    if not _NAME.fullmatch(getattr(task, "name", "")):
        raise TaskRegistryError(f"entry point {point.value}: a task's name is 1-32 of a-z, 0-9 and _, from a letter")
    if point.name != task.name:
        raise TaskRegistryError(f"entry point {point.name!r} names a task called {task.name!r}: use one name")
    long = [output for output in task.series_numbers if not 1 <= len(output) <= 16]
    if not task.series_numbers or long:
        raise TaskRegistryError(f"entry point {point.value}: a task has outputs of 1-16 characters, not {long}")
    return task


def _distribution(point: EntryPoint) -> str | None:
    return point.dist.name if point.dist is not None else None
