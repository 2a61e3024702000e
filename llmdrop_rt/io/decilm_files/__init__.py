"""The DeciLM (nemotron-nas) configuration and modeling files that `export_model(..., fmt="decilm")` writes next to
the weights, for transformers' `trust_remote_code`. They are plain source files of the export; llmdrop-rt itself
never runs them (its loader reads the folder's config.json only)."""
