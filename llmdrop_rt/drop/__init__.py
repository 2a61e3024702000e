"""The drop method: calibration data, layer sources, importance metrics, selection, perplexity, sweeps, plots."""
