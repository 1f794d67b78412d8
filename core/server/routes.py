"""The HTTP endpoints: each reads its body, checks it (``models``), makes the engine's rows and
hands them to the scheduler; answers are built by ``models``. Imported only when an app is
made, since it needs FastAPI."""

import asyncio
import contextlib
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import AdapterError
from .models import (
    AdapterRequest,
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_messages,
    chunk,
    chunk_kind,
    completion_response,
    model_cards,
    parse_body,
    prompts_of,
    sampling_params,
    sse,
    usage,
)
from .scheduler import QueueFull, StreamTicket

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.05


async def cancel_when_disconnected(request, ticket):
    """Cancel the rows of a client that went away before its whole answer (a stream notices by
    itself when it next writes)."""
    while not ticket.finished:
        if await request.is_disconnected():
            ticket.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


class HeldTicket(StreamTicket):
    """A ticket whose adapters the request holds (``AdapterServer.acquire``) until the
    scheduler delivers its end: its rows have left the engine, so its adapter may go."""

    def __init__(self, rows, release):
        self.release = release
        super().__init__(rows)

    def _push(self, item):
        super()._push(item)
        if item is None or isinstance(item, Exception):
            self.release()


def release_once(engine, adapter):
    """A callable releasing ``adapter`` the first time it is called."""
    released = []

    def release():
        if not released:
            released.append(True)
            engine.release([adapter])

    return release


def api_router(engine, scheduler, *, allow_adapter_loading, max_tokens_cap, max_queue, max_body_bytes, base_name):
    """The ``/v1`` endpoints over ``engine`` (an ``AdapterServer``) and its ``scheduler``."""
    router = APIRouter()
    created = int(time.time())

    async def read_body(request, schema):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise ApiError(
                413, f"the request body has {length} bytes; this server takes at most {max_body_bytes} (--max-body-bytes)"
            )
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_body_bytes:
                raise ApiError(413, f"the request body is over {max_body_bytes} bytes (--max-body-bytes)")
        return parse_body(body, schema)

    async def hold(model):
        """The adapter ``model`` names (``None``: the base), held (loaded on demand, off the
        event loop), and the callable that releases it."""
        adapter = None if model == base_name else model
        await run_in_threadpool(engine.acquire, [adapter])
        return adapter, release_once(engine, adapter)

    def sampling(body, prompt_lengths, default_max_tokens):
        return sampling_params(
            body,
            prompt_lengths,
            default_max_tokens=default_max_tokens,
            context_length=engine.context_length,
            max_tokens_cap=max_tokens_cap,
        )

    async def deltas(ticket):
        """The ticket's deltas; its failed batch as an ``ApiError``."""
        async with contextlib.aclosing(ticket.deltas()) as stream:  # closing it cancels unfinished rows
            try:
                async for delta in stream:
                    yield delta
            except Exception as exc:
                raise ApiError.of(exc) from None

    async def respond(request, body, rows, chat, release):
        """Queue ``rows``; from then on their ticket releases the adapter when they are done."""
        ticket = HeldTicket(rows, release)
        try:
            scheduler.submit(ticket)
        except QueueFull:
            release()
            raise ApiError(
                503, f"the server has {max_queue} requests waiting (--max-queue); retry shortly", headers={"Retry-After": "1"}
            ) from None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if not body.stream:
            watcher = asyncio.create_task(cancel_when_disconnected(request, ticket))
            try:
                async for _ in deltas(ticket):
                    pass
            finally:
                watcher.cancel()
            return JSONResponse(completion_response(head, rows, chat))

        async def events():
            if chat:
                for row in rows:
                    yield sse(chunk(head, chat, row.index, "", None, first=True))
            try:
                async for delta in deltas(ticket):
                    yield sse(chunk(head, chat, delta.index, delta.text, delta.finish_reason))
            except ApiError as exc:
                yield sse(exc.body())
            if (body.stream_options or {}).get("include_usage"):
                yield sse({**head, "object": chunk_kind(chat), "choices": [], "usage": usage(rows)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @router.get("/v1/models")
    async def models():
        return model_cards(base_name, await run_in_threadpool(lambda: engine.servable), created)

    @router.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, CompletionRequest)
        constraint = await run_in_threadpool(engine.constraint, body.response_format)
        adapter, release = await hold(body.model)
        try:
            encoded = [engine.encode(p) for p in prompts_of(body, engine.max_batch_size)]
            params = sampling(body, [len(e) for e in encoded], default_max_tokens=16)
            rows = [engine.row(ids, adapter, params, index=i, constraint=constraint) for i, ids in enumerate(encoded)]
        except BaseException:
            release()
            raise
        return await respond(request, body, rows, chat=False, release=release)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, ChatRequest)
        constraint = await run_in_threadpool(engine.constraint, body.response_format)
        adapter, release = await hold(body.model)
        try:
            encoded = engine.encode(chat_messages(body.messages), chat=True)
            params = sampling(body, [len(encoded)], default_max_tokens=None)
            rows = [engine.row(encoded, adapter, params, constraint=constraint)]
        except BaseException:
            release()
            raise
        return await respond(request, body, rows, chat=True, release=release)

    def check_loading_allowed():
        if not allow_adapter_loading:
            raise ApiError(403, "loading and unloading adapters is off; start the server with --allow-adapter-loading")

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        check_loading_allowed()
        body = await read_body(request, AdapterRequest)
        if not body.lora_path:
            raise ApiError(400, "lora_path: give the adapter directory to load", "lora_path")
        try:
            await run_in_threadpool(engine.load, body.lora_name, body.lora_path)
        except AdapterError as exc:
            raise ApiError(400, str(exc), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        check_loading_allowed()
        body = await read_body(request, AdapterRequest)
        await run_in_threadpool(engine.unload, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @router.get("/v1/stats")
    async def stats():
        return {**scheduler.snapshot(), "loaded_adapters": len(engine.adapters), "evictions": engine.evictions}

    return router
