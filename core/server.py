"""``ftengine serve``: an OpenAI-compatible HTTP server over ``ftengine.serving.AdapterServer``.

    pip install 'ftengine[serve]'
    ftengine serve --model models/base --adapter support=runs/a/final --adapter sales=runs/b/final
    curl localhost:8000/v1/completions -d '{"model": "sales", "prompt": "Hi", "max_tokens": 16}'

Endpoints: ``GET /v1/models`` (the base and each adapter), ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` for server-sent events ending in
``data: [DONE]``), ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (vLLM's
names; off unless ``--allow-adapter-loading``), ``GET /v1/stats`` (the scheduler's counters).
The request's ``model`` names the adapter (the base model's own name: no adapter).

One scheduler thread runs every forward: requests that wait are taken together (any mix of
adapters) into one batch, whose rows each keep their own adapter, sampling parameters, seed
and stop strings; batches started while others run are stepped in turn. Errors are OpenAI's
JSON (``{"error": {"message", "type", "param", "code"}}``) with the HTTP status OpenAI uses.

FastAPI and uvicorn are imported only when a server is made, so ``ftengine --help`` works
without them.
"""

import asyncio
import collections
import contextlib
import json
import threading
import time
import uuid

import click

from .errors import AdapterError, FtengineError
from .inference import adapters_option, model_option, strict_option
from .serving import AdapterServer, RequestError, SamplingParams

DEFAULTS = {"host": "127.0.0.1", "port": 8000, "max_tokens_cap": 1024, "max_queue": 64, "max_body_bytes": 1 << 20}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {...}}`` with ``status``."""

    TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error"}

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @classmethod
    def of(cls, exc):
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, RequestError):
            return cls(exc.status, str(exc), exc.param, exc.code)
        if isinstance(exc, FtengineError):
            return cls(400, str(exc))
        return cls(500, f"internal error: {type(exc).__name__}: {exc}")

    def body(self):
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------------------------
# the scheduler
# --------------------------------------------------------------------------------------------


class Ticket:
    """One HTTP request's rows and the asyncio queue its handler reads deltas from."""

    def __init__(self, rows, loop):
        self.rows, self.loop, self.queue = rows, loop, asyncio.Queue()
        self.done = False  # the end of its deltas was sent
        for row in rows:
            row.ticket = self

    def push(self, item):
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    @property
    def finished(self):
        return all(row.finish_reason is not None for row in self.rows)

    def cancel(self):
        for row in self.rows:
            row.cancel()


class QueueFull(Exception):
    pass


class Scheduler:
    """Runs every forward in one background thread.

    Waiting tickets are taken together, up to ``max_batch_size`` rows, as one batch
    (``AdapterServer.run``); while batches run, new tickets start another batch at once, and
    the batches are stepped in turn. ``stats`` counts forwards and *shared* forwards (rows of
    more than one request in one forward).
    """

    def __init__(self, engine, max_queue, max_batch_size, batch_window_s=0.01):
        self.engine, self.max_queue, self.max_batch_size, self.batch_window_s = engine, max_queue, max_batch_size, batch_window_s
        self.waiting = collections.deque()
        self.condition = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="ftengine-scheduler", daemon=True)
        self.stats = {
            "requests": 0,
            "batches": 0,
            "forwards": 0,
            "shared_forwards": 0,
            "max_batch_rows": 0,
            "max_batch_adapters": 0,
            "cancelled_rows": 0,
        }
        self.running_rows = 0

    def start(self):
        self.thread.start()

    def stop(self):
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join()

    def submit(self, ticket):
        with self.condition:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
            self.waiting.append(ticket)
            self.stats["requests"] += 1
            self.condition.notify()

    def snapshot(self):
        with self.condition:
            return {**self.stats, "waiting": len(self.waiting), "running_rows": self.running_rows}

    def _take(self, room, at_least_one):
        """Waiting tickets, in order, while their rows fit in ``room`` (the first one anyway
        when ``at_least_one``: nothing runs)."""
        taken = []
        with self.condition:
            while self.waiting and (len(self.waiting[0].rows) <= room or (at_least_one and not taken)):
                ticket = self.waiting.popleft()
                room -= len(ticket.rows)
                if not all(row.cancelled for row in ticket.rows):
                    taken.append(ticket)
        return taken

    def _loop(self):
        active = []  # [(step iterator, tickets)]
        while True:
            with self.condition:
                if not active and not self.waiting:
                    if self.stopping:
                        return
                    self.condition.wait(timeout=0.5)
                    continue
                has_waiting = bool(self.waiting)
            room = self.max_batch_size - sum(len(t.rows) for _, tickets in active for t in tickets if not t.finished)
            if has_waiting and room > 0:
                if not active:
                    time.sleep(self.batch_window_s)  # let requests sent together arrive together
                tickets = self._take(room, at_least_one=not active)
                if tickets:
                    rows = [row for ticket in tickets for row in ticket.rows]
                    active.append((self.engine.run(rows), tickets))
                    self.stats["batches"] += 1
                    self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(rows))
                    self.stats["max_batch_adapters"] = max(self.stats["max_batch_adapters"], len({r.adapter for r in rows}))
            for entry in list(active):
                steps, tickets = entry
                sharing = sum(1 for t in tickets if not t.finished) > 1
                try:
                    deltas = next(steps)
                except StopIteration:
                    active.remove(entry)
                    with self.condition:
                        self.stats["cancelled_rows"] += sum(1 for t in tickets for r in t.rows if r.finish_reason == "cancelled")
                    continue
                except Exception as exc:  # a failed batch fails its requests, not the server
                    active.remove(entry)
                    for ticket in tickets:
                        ticket.push(exc)
                    continue
                with self.condition:
                    self.stats["forwards"] += 1
                    self.stats["shared_forwards"] += sharing
                    self.running_rows = sum(1 for _, ts in active for t in ts for r in t.rows if r.finish_reason is None)
                for delta in deltas:
                    delta.row.ticket.push(delta)
                for ticket in tickets:
                    if ticket.finished and not ticket.done:
                        ticket.done = True
                        ticket.push(None)


# --------------------------------------------------------------------------------------------
# the application
# --------------------------------------------------------------------------------------------


def create_app(
    engine,
    *,
    allow_adapter_loading=False,
    max_tokens_cap=DEFAULTS["max_tokens_cap"],
    max_queue=DEFAULTS["max_queue"],
    max_body_bytes=DEFAULTS["max_body_bytes"],
    base_name=None,
    batch_window_s=0.01,
):
    """The FastAPI application serving ``engine`` (an ``AdapterServer``); its lifespan starts
    and stops the scheduler thread."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.concurrency import run_in_threadpool

    scheduler = Scheduler(engine, max_queue=max_queue, max_batch_size=engine.max_batch_size, batch_window_s=batch_window_s)
    base_name = base_name or engine.model_name
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="ftengine", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(ApiError)
    async def api_error(request, exc):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    class Common(BaseModel):
        model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
        model: str
        max_tokens: int | None = None
        temperature: float = 1.0
        top_p: float = 1.0
        top_k: int = 0
        seed: int | None = None
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: dict | None = None
        n: int = Field(1, ge=1, le=1)

    class CompletionBody(Common):
        prompt: str | list[str] | list[int] | list[list[int]]

    class ChatBody(Common):
        messages: list[dict] = Field(min_length=1)
        max_completion_tokens: int | None = None

    async def read_body(request, schema):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise ApiError(
                413, f"the request body has {length} bytes; this server takes at most {max_body_bytes} (--max-body-bytes)"
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise ApiError(413, f"the request body is over {max_body_bytes} bytes (--max-body-bytes)")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            param = ".".join(str(p) for p in error["loc"])
            raise ApiError(400, f"{param}: {error['msg']}", param=str(error["loc"][0]) if error["loc"] else None) from None

    def adapter_of(model):
        if model == base_name:
            return None
        engine.check_adapter(model)
        return model

    def sampling(body, prompt_lengths, default_max_tokens):
        max_tokens = body.max_tokens if body.max_tokens is not None else getattr(body, "max_completion_tokens", None)
        if max_tokens is None:
            room = engine.context_length - max(prompt_lengths)
            max_tokens = min(default_max_tokens or max_tokens_cap, max_tokens_cap, max(room, 1))
        if isinstance(max_tokens, int) and max_tokens > max_tokens_cap:
            raise ApiError(
                400, f"max_tokens: {max_tokens} is over this server's cap of {max_tokens_cap} (--max-tokens-cap)", "max_tokens"
            )
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return SamplingParams(max_tokens, body.temperature, body.top_p, body.top_k, body.seed, stop)

    async def submit(rows):
        ticket = Ticket(rows, asyncio.get_running_loop())
        try:
            scheduler.submit(ticket)
        except QueueFull:
            raise ApiError(
                503, f"the server has {max_queue} requests waiting (--max-queue); retry shortly", headers={"Retry-After": "1"}
            ) from None
        return ticket

    async def deltas(ticket):
        """The ticket's deltas until all its rows finished; cancels its rows if abandoned."""
        try:
            while True:
                item = await ticket.queue.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise ApiError.of(item)
                yield item
        finally:
            if not ticket.finished:
                ticket.cancel()  # the client went away: free its rows at the next step

    def usage(rows):
        prompt, completion = sum(len(r.prompt_ids) for r in rows), sum(len(r.token_ids) for r in rows)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(data):
        return f"data: {json.dumps(data)}\n\n"

    async def respond(body, rows, chat):
        ticket = await submit(rows)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "created": int(time.time()), "model": body.model}
        if not body.stream:
            async for _ in deltas(ticket):
                pass
            if chat:
                choices = [
                    {
                        "index": r.index,
                        "message": {"role": "assistant", "content": r.text},
                        "logprobs": None,
                        "finish_reason": r.finish_reason,
                    }
                    for r in rows
                ]
            else:
                choices = [{"index": r.index, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason} for r in rows]
            kind = "chat.completion" if chat else "text_completion"
            return JSONResponse({**head, "object": kind, "choices": choices, "usage": usage(rows)})

        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index, text, finish_reason, first=False):
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return sse({**head, "object": kind, "choices": [choice]})

        async def events():
            if chat:
                for row in rows:
                    yield chunk(row.index, "", None, first=True)
            try:
                async for delta in deltas(ticket):
                    yield chunk(delta.index, delta.text, delta.finish_reason)
            except ApiError as exc:
                yield sse(exc.body())
            if (body.stream_options or {}).get("include_usage"):
                yield sse({**head, "object": kind, "choices": [], "usage": usage(rows)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/v1/models")
    async def models():
        cards = [
            {"id": base_name, "object": "model", "created": created, "owned_by": "ftengine", "root": base_name, "parent": None}
        ]
        cards += [
            {"id": name, "object": "model", "created": created, "owned_by": "ftengine", "root": str(path), "parent": base_name}
            for name, path in engine.adapters.items()
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, CompletionBody)
        adapter = adapter_of(body.model)
        prompts = (
            body.prompt
            if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int)
            else [body.prompt]
        )
        if len(prompts) > engine.max_batch_size:
            raise ApiError(
                400,
                f"prompt: {len(prompts)} prompts in one request; at most {engine.max_batch_size} (--max-batch-size)",
                "prompt",
            )
        encoded = [engine.encode(p) for p in prompts]
        params = sampling(body, [len(e) for e in encoded], default_max_tokens=16)
        rows = [engine.row(ids, adapter, params, index=i) for i, ids in enumerate(encoded)]
        return await respond(body, rows, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, ChatBody)
        adapter = adapter_of(body.model)
        encoded = engine.encode(chat_messages(body.messages), chat=True)
        params = sampling(body, [len(encoded)], default_max_tokens=None)
        return await respond(body, [engine.row(encoded, adapter, params)], chat=True)

    class LoadBody(BaseModel):
        lora_name: str
        lora_path: str | None = None

    def check_loading_allowed():
        if not allow_adapter_loading:
            raise ApiError(403, "loading and unloading adapters is off; start the server with --allow-adapter-loading")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        check_loading_allowed()
        body = await read_body(request, LoadBody)
        if not body.lora_path:
            raise ApiError(400, "lora_path: give the adapter directory to load", "lora_path")
        try:
            await run_in_threadpool(engine.load, body.lora_name, body.lora_path)
        except AdapterError as exc:
            raise ApiError(400, str(exc), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        check_loading_allowed()
        body = await read_body(request, LoadBody)
        await run_in_threadpool(engine.unload, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/v1/stats")
    async def stats():
        return scheduler.snapshot()

    @app.exception_handler(FtengineError)
    async def ftengine_error(request, exc):
        return await api_error(request, ApiError.of(exc))

    return app


def chat_messages(messages):
    """OpenAI messages as the chat template takes them: content parts joined into text."""
    result = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"messages.{i}.role: {role!r} is not a chat role (system, user, assistant, tool)", "messages")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, f"messages.{i}.content: expected a string or a list of text parts", "messages")
        result.append({"role": "system" if role == "developer" else role, "content": content})
    return result


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
    served_model_name,
    plugins,
):
    """Serve a base model and its adapters over an OpenAI-compatible HTTP API.

    Each adapter is a model of the API; requests for any mix of adapters share forward passes.
    SIGTERM (or Ctrl-C) stops taking requests, finishes those in flight, and exits.
    """
    _require_serve_extra()
    import uvicorn

    engine = AdapterServer(model, adapters, plugins, max_batch_size=max_batch_size, strict=strict)
    app = create_app(
        engine,
        allow_adapter_loading=allow_adapter_loading,
        max_tokens_cap=max_tokens_cap,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        base_name=served_model_name,
    )
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=None)
