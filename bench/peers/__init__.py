"""Benchmark peers written for bench/: the OpenRLHF-style reward server and the naive (no reuse) server."""
