"""Benchmarks of the fused decoder against its own forwards and against baselines (`fusion-llm bench`)."""

from .run import BenchSettings, markdown, run_bench, write_report

__all__ = ["BenchSettings", "markdown", "run_bench", "write_report"]
