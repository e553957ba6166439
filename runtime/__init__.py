"""Runtime engines: one stack that evaluation, serving and benchmarks use alike."""
