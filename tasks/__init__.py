"""Fusion task definitions, datasets, losses, metrics and downstream heads.

Importing this package registers the built-in tasks.
"""

from timfusion.tasks import families  # noqa: F401  (registers the built-in tasks)
from timfusion.tasks.base import TASKS, FusionTask, build_task  # noqa: F401
