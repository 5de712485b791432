"""Benchmarks of swapper against llama-server directly and llama.cpp's router mode (bench/run.py)."""
