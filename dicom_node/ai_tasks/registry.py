"""The tasks installed, found through Python entry points of the group ``dicom_node.tasks``.

Each entry point names a :class:`~dicom_node.ai_tasks.interface.Task` subclass, under the task's name::

    [project.entry-points."dicom_node.tasks"]
    fracture = "fracture_task:FractureTask"

The node's own tasks are the entry points of the ``dicom-node`` distribution; they run when config.yaml lists
no tasks. A site's task runs once it is installed and listed under ``inference.tasks``. An entry point that
cannot be used (it does not load, or takes another task's name or series numbers) is set aside with its reason:
it stops a node configured to run it with that reason in one line, and no other.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from dicom_node.ai_tasks.interface import MAP_SERIES_OFFSET, RESERVED_SERIES_NUMBERS, GateTask, Task
from inference.model_card import TASK_NAME

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dicom_node.tasks"
NODE_DISTRIBUTION = "dicom-node"
_NAME = re.compile(TASK_NAME)


class TaskRegistryError(Exception):
    """An installed task cannot be used; the message names its entry point and the problem."""


@dataclass(frozen=True)
class Registry:
    tasks: dict[str, type[Task]]  # by name, the node's own first
    broken: dict[str, str]  # the entry points that cannot be used, by name: why


@functools.cache
def registry() -> Registry:
    """Every installed task, the node's own first. One that cannot be used is set aside with the reason, so that
    it stops only a node configured to run it (:func:`task_type` says why), never the others."""
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda point: _distribution(point) != NODE_DISTRIBUTION)
    tasks: dict[str, type[Task]] = {}
    broken: dict[str, str] = {}
    series = dict.fromkeys(RESERVED_SERIES_NUMBERS, "the node's")
    for point in found:
        try:
            task = _load(point)
            if task.name in tasks:
                raise TaskRegistryError(f"entry point {point.value}: a task named {task.name!r} is installed twice")
            numbers = [n for number in task.series_numbers.values() for n in (number, number + MAP_SERIES_OFFSET)]
            taken = [f"{number} ({series[number]})" for number in numbers if number in series]
            if taken:
                raise TaskRegistryError(f"entry point {point.value}: series numbers taken: {', '.join(taken)}")
        except TaskRegistryError as error:
            broken[point.name] = str(error)
            log.error("%s", error)
            continue
        series |= dict.fromkeys(numbers, task.name)
        tasks[task.name] = task
    return Registry(tasks, broken)


def installed_tasks() -> dict[str, type[Task]]:
    """Every usable installed task by name, the node's own first."""
    return registry().tasks


@functools.cache
def node_tasks() -> tuple[str, ...]:
    """The names of the node's own tasks, sorted by name, as setuptools writes a distribution's entry points."""
    return tuple(
        point.name for point in entry_points(group=ENTRY_POINT_GROUP) if _distribution(point) == NODE_DISTRIBUTION
    )


def default_tasks() -> tuple[str, ...]:
    """The tasks that run when config.yaml lists none: the node's own but a gate. A gate changes which tasks read
    an image, so it runs where the configuration lists it (the shipped config.yaml does): a site whose file lists
    no tasks keeps its routing by the tags."""
    found = registry()  # a broken one is kept: a node configured by default stops with its reason, as before
    return tuple(name for name in node_tasks() if name in found.broken or not issubclass(found.tasks[name], GateTask))


def task_type(name: str) -> type[Task]:
    """The installed task ``name``; ValueError naming why it cannot be used, or the installed ones."""
    found = registry()
    if name in found.broken:
        raise ValueError(found.broken[name])
    if name not in found.tasks:
        raise ValueError(f"no task {name!r} is installed (installed: {', '.join(found.tasks) or 'none'})")
    return found.tasks[name]


def _load(point: EntryPoint) -> type[Task]:
    try:
        task = point.load()
    except Exception as error:
        raise TaskRegistryError(f"entry point {point.value}: cannot load: {type(error).__name__}: {error}") from None
    where = f"entry point {point.value}"
    if not (isinstance(task, type) and issubclass(task, Task)) or inspect.isabstract(task):
        raise TaskRegistryError(f"{where}: not a concrete subclass of dicom_node.ai_tasks.interface.Task")
    if not _NAME.fullmatch(getattr(task, "name", "")):
        raise TaskRegistryError(f"{where}: a task's name is 1-32 of a-z, 0-9 and _, from a letter")
    if point.name != task.name:
        raise TaskRegistryError(f"entry point {point.name!r} names a task called {task.name!r}: use one name")
    long = [output for output in task.series_numbers if not 1 <= len(output) <= 16]
    if not task.series_numbers or long:
        raise TaskRegistryError(f"{where}: a task has outputs of 1-16 characters, not {long}")
    if task.viewer_template is not None and not task.viewer_template.is_file():
        raise TaskRegistryError(f"{where}: no viewer template at {task.viewer_template}")
    try:
        re.compile(task.routing_pattern)
    except re.error as error:
        raise TaskRegistryError(f"{where}: routing_pattern is not a regular expression: {error}") from None
    return task


def _distribution(point: EntryPoint) -> str | None:
    return point.dist.name if point.dist is not None else None
