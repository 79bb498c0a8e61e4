"""Shared helpers for the benchmark scripts: the library's own environment record and tables."""

from __future__ import annotations

from iirp.bench.environment import cpu_model, environment, markdown_table

__all__ = ["cpu_model", "environment", "markdown_table"]
