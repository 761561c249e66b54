"""Benchmarks: workloads, peers and reports (bench/RESULTS.md)."""
