"""The real server in a thread, for the tests that drive it over HTTP."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import uvicorn

from smollm3_mlx.serve.app import DEFAULT_READ_TIMEOUT, header_deadline, make_app
from smollm3_mlx.serve.engine import Engine

MODEL = "smollm3-tiny"


@contextmanager
def running(
    loaded, *, queue_size=4, cache_bytes=256 * 1024**2, cache_dir=None, max_batch=4, **options
):
    """A real server (uvicorn, loopback, a free port) in a thread, its engine exposed."""
    model, tokenizer = loaded
    engine = Engine(
        model,
        tokenizer,
        queue_size=queue_size,
        cache_bytes=cache_bytes,
        cache_dir=cache_dir,
        max_batch=max_batch,
    )
    app = make_app(engine, model_name=MODEL, **options)
    timeout = options.get("read_timeout", DEFAULT_READ_TIMEOUT)  # serve's protocol, as it runs
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="on",
        http=header_deadline(timeout),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        yield SimpleNamespace(url=url, engine=engine, tokenizer=tokenizer)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive()
