"""`diffusion-mic study`: diffusion against the traditional models, on the same data and budget."""
from .report import write_report
from .runner import TASKS, run_study

__all__ = ["TASKS", "run_study", "write_report"]
