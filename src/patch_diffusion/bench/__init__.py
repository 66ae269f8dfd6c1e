"""Benchmarks of the paper's claims, run on demand (never in timing-sensitive tests)."""

from .report import time_to_reach, write_plot, write_report
from .throughput import format_table, run_throughput
from .time_to_fid import ARMS, BenchConfig, run_time_to_fid

__all__ = ["ARMS", "BenchConfig", "format_table", "run_throughput", "run_time_to_fid", "time_to_reach",
           "write_plot", "write_report"]
