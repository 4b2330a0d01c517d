"""spiral's benchmarks, run from a checkout as modules: ``python -m bench.NAME``."""
