"""`clusterfx bench thc`: THC's runtime and memory against the number of ROIs (apps/thc)."""

from clusterfx.apps.thc.command import add_bench_arguments as add_arguments
from clusterfx.apps.thc.command import run_bench as run

__all__ = ["add_arguments", "run"]
