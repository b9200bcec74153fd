"""Benchmarks, studies and closed-loop evaluation (a package so the eval modules can import each other)."""
