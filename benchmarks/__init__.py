"""benchmarks (under construction)."""
