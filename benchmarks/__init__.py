"""Benchmark fixtures for moefx: data helpers, the two trained MoE fixture models and their training script."""
