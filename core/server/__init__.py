"""``ftengine serve``: an OpenAI-compatible HTTP server over ``ftengine.serving.AdapterServer``.

    pip install 'ftengine[serve]'
    ftengine serve --model models/base --adapter support=runs/a/final --adapter sales=runs/b/final
    curl localhost:8000/v1/completions -d '{"model": "sales", "prompt": "Hi", "max_tokens": 16}'

Endpoints: ``GET /v1/models`` (the base and each adapter), ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` for server-sent events ending in
``data: [DONE]``), ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (vLLM's
names; off unless ``--allow-adapter-loading``), ``GET /v1/stats`` (the scheduler's and engine's counters).
The request's ``model`` names the adapter (the base model's own name: no adapter); with
``--adapter-dir``, any folder of it, loaded on its first request.

One scheduler thread runs every forward over one continuous batch: at every step, waiting
requests (any mix of adapters) are admitted and prefilled together, then every running row
decodes one token, and rows leave the moment they finish; each row keeps its own adapter,
sampling parameters, seed and stop strings, and a row that fails fails alone. Errors are OpenAI's
JSON (``{"error": {"message", "type", "param", "code"}}``) with the HTTP status OpenAI uses,
unknown routes and unforeseen exceptions (500, logged) included.

The pieces, each testable alone: ``models`` (request models, their bounds, the answers'
JSON), ``scheduler`` (tickets, the queue, the batching thread over the engine; no HTTP),
``routes`` (the endpoints, thin). FastAPI and uvicorn are imported only when a server is
made, so ``ftengine --help`` works without them.
"""

import logging

import click

from ..errors import FtengineError
from ..inference import adapters_option, model_option, strict_option
from ..serving import AdapterServer
from .models import ApiError
from .scheduler import Scheduler

DEFAULTS = {
    "host": "127.0.0.1",
    "port": 8000,
    "max_tokens_cap": 1024,
    "max_queue": 64,
    "max_body_bytes": 1 << 20,
    "max_loaded_adapters": 8,
    "shutdown_timeout": 5.0,
}
logger = logging.getLogger("ftengine.server")


def create_app(
    engine,
    *,
    allow_adapter_loading=False,
    max_tokens_cap=DEFAULTS["max_tokens_cap"],
    max_queue=DEFAULTS["max_queue"],
    max_body_bytes=DEFAULTS["max_body_bytes"],
    base_name=None,
    batch_window_s=0.01,
    continuous=True,
):
    """The FastAPI application serving ``engine`` (an ``AdapterServer``); its lifespan starts
    and stops the scheduler thread. ``continuous=False`` admits requests only into an empty
    batch (the benchmark's baseline)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from .routes import api_router

    scheduler = Scheduler(
        engine, max_queue=max_queue, max_batch_size=engine.max_batch_size, batch_window_s=batch_window_s, continuous=continuous
    )

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="ftengine", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.include_router(
        api_router(
            engine,
            scheduler,
            allow_adapter_loading=allow_adapter_loading,
            max_tokens_cap=max_tokens_cap,
            max_queue=max_queue,
            max_body_bytes=max_body_bytes,
            base_name=base_name or engine.model_name,
        )
    )

    @app.exception_handler(ApiError)
    async def api_error(request, exc):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(FtengineError)
    async def ftengine_error(request, exc):
        return await api_error(request, ApiError.of(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # an unknown route or method
        return await api_error(request, ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def unexpected_error(request, exc):  # a bug: the client still gets OpenAI's shape
        logger.exception("%s %s failed", request.method, request.url.path)
        return await api_error(request, ApiError.of(exc))

    return app


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def _require_serve_extra():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise FtengineError(
            f"ftengine serve needs FastAPI and uvicorn ({exc.name} is missing): pip install 'ftengine[serve]'"
        ) from None


@click.command(name="serve")
@model_option
@adapters_option("Serve an adapter as model NAME (repeatable).")
@strict_option
@click.option(
    "--host", default=DEFAULTS["host"], show_default=True, help="Address to bind; 0.0.0.0 exposes the server to the network."
)
@click.option("--port", default=DEFAULTS["port"], show_default=True, type=click.IntRange(0, 65535))
@click.option("--allow-adapter-loading", is_flag=True, help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter.")
@click.option(
    "--max-tokens-cap",
    default=DEFAULTS["max_tokens_cap"],
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest max_tokens a request may ask for.",
)
@click.option(
    "--max-queue",
    default=DEFAULTS["max_queue"],
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests waiting for a batch before new ones get 503.",
)
@click.option(
    "--max-body-bytes",
    default=DEFAULTS["max_body_bytes"],
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest request body (413 above).",
)
@click.option("--max-batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="Rows per forward pass.")
@click.option(
    "--adapter-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Serve every adapter folder of DIR by its folder name, loaded on its first request.",
)
@click.option(
    "--max-loaded-adapters",
    default=DEFAULTS["max_loaded_adapters"],
    show_default=True,
    type=click.IntRange(min=1),
    help="Adapters of --adapter-dir loaded at once; the least recently used one no request holds is evicted.",
)
@click.option(
    "--shutdown-timeout",
    default=DEFAULTS["shutdown_timeout"],
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds SIGTERM waits for in-flight requests before cancelling them and exiting.",
)
@click.option("--served-model-name", default=None, help="The base model's name in the API (default: --model).")
@click.option(
    "--plugin", "-p", "plugins", multiple=True, help="Activate another plugin (repeatable), e.g. qlora for a 4-bit base."
)
def serve_command(
    model,
    adapters,
    strict,
    host,
    port,
    allow_adapter_loading,
    max_tokens_cap,
    max_queue,
    max_body_bytes,
    max_batch_size,
    adapter_dir,
    max_loaded_adapters,
    shutdown_timeout,
    served_model_name,
    plugins,
):
    """Serve a base model and its adapters over an OpenAI-compatible HTTP API.

    Each adapter is a model of the API; requests for any mix of adapters share forward passes.
    SIGTERM (or Ctrl-C) stops taking requests, finishes those in flight (for up to
    --shutdown-timeout seconds, then cancels them), and exits.
    """
    _require_serve_extra()
    import uvicorn

    engine = AdapterServer(
        model,
        adapters,
        plugins,
        max_batch_size=max_batch_size,
        strict=strict,
        adapter_dir=adapter_dir,
        max_loaded_adapters=max_loaded_adapters,
    )
    app = create_app(
        engine,
        allow_adapter_loading=allow_adapter_loading,
        max_tokens_cap=max_tokens_cap,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        base_name=served_model_name,
    )
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=shutdown_timeout)
