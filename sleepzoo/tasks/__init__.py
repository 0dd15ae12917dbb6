"""Synthetic tasks (plugins of kind ``task``): the :class:`~sleepzoo.tasks.base.Task` protocol and built-ins.

Built-in tasks are found through the registry (``registry.get("task", "rule110")``), which imports each
task's module only when it is asked for; this package imports just the protocol.
"""

from sleepzoo.tasks.base import IGNORE_INDEX, Task, stable_hash

__all__ = ["IGNORE_INDEX", "Task", "stable_hash"]
