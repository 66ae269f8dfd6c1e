"""Benchmarks of the paper's claims, run on demand (never in timing-sensitive tests)."""

from .report import time_to_reach
from .time_to_fid import ARMS, BenchConfig, run_time_to_fid

__all__ = ["ARMS", "BenchConfig", "run_time_to_fid", "time_to_reach"]
