"""Runnable examples; ``examples.shop`` is the schema the demo, the tests and the benchmarks share."""
