"""Speed benches: the quick bench, sweeps, baselines, the KV-cache table, synthetic weights, profiling."""
