"""Putting the server together (batcher, worker, app) and running it with uvicorn, in the foreground or on a
background thread."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import uvicorn

from ..engine.batching import ContinuousBatcher
from ..runtime import LLM
from .app import create_app
from .worker import BatchWorker

DEFAULT_MAX_LEN = 2048


@dataclass
class ServerSettings:
    model_name: str
    max_batch: int = 8
    max_len: int | None = None  # default: the model's context, at most DEFAULT_MAX_LEN
    max_queue: int = 64
    timeout_s: float = 600.0
    api_key: str | None = None


def build(llm: LLM, settings: ServerSettings):
    """The app and its (not yet started) worker."""
    max_len = settings.max_len or min(DEFAULT_MAX_LEN, llm.cfg.max_position_embeddings)
    batcher = ContinuousBatcher(llm.model, settings.max_batch, max_len, llm.engine.attn_backend)
    worker = BatchWorker(batcher, settings.max_queue)
    return create_app(llm, worker, settings.model_name, settings.api_key, settings.timeout_s), worker


def serve(llm: LLM, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000):
    """Serve until interrupted."""
    app, worker = build(llm, settings)
    pool = worker.batcher.pool
    print(f"serving {settings.model_name} at http://{host}:{port}/v1: {pool.batch_size} rows x {pool.max_len} "
          f"tokens, KV pool {pool.nbytes() / 2**20:.0f} MiB", flush=True)
    worker.start()
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
    finally:
        worker.stop()


class BackgroundServer:
    """A server on a thread of this process, on a free port of `host` (tests, benchmarks). Use as a context
    manager; `url` is its API base (http://host:port/v1)."""

    def __init__(self, llm: LLM, settings: ServerSettings, host: str = "127.0.0.1", start_timeout_s: float = 30.0):
        self.app, self.worker = build(llm, settings)
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=0, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="llmdrop-rt server", daemon=True)
        self.host, self.start_timeout_s = host, start_timeout_s
        self.url = None

    def __enter__(self) -> BackgroundServer:
        self.worker.start()
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.__exit__()
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}/v1"
        return self

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join()
        self.worker.stop()
