"""alchemy_ops benchmark suite: ``python -m benchmarks`` (``make bench``)."""
