"""timfusion: task-guided, implicitly-searched, meta-initialized image fusion."""

__version__ = "0.1.0"
