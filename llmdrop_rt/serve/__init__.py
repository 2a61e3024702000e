"""`python -m llmdrop_rt serve`: an OpenAI-compatible HTTP server over the continuous-batching engine (needs the
optional `serve` extra: FastAPI, uvicorn, prometheus-client)."""
