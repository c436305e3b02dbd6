"""recscore's benchmarks: pytest-benchmark microbenchmarks (test_bench_*.py) and peer comparisons (compare_*.py)."""
