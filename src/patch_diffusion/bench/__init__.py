"""Benchmarks of the paper's claims, run on demand (never in timing-sensitive tests)."""

from .report import time_to_reach, write_plot, write_report
from .samplers import run_sampler_sweep, steps_for_nfe
from .throughput import format_table, run_throughput
from .time_to_fid import ARMS, BenchConfig, run_time_to_fid

__all__ = ["ARMS", "BenchConfig", "format_table", "run_throughput", "run_sampler_sweep", "run_time_to_fid", "steps_for_nfe", "time_to_reach",
           "write_plot", "write_report"]
