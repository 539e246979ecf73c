"""Runnable examples; `examples.shop` is the schema of the demo, the tests and the benchmarks."""
