"""The server's pieces alone (issue 23): request models and their bounds without a server, the
scheduler with the real engine on the tiny model without HTTP. ``test_server.py`` drives them
together through a real uvicorn and the openai client."""

import asyncio
import contextlib
import dataclasses
import queue
import time
from pathlib import Path

import pytest
from ftengine.errors import FtengineError
from ftengine.serving import AdapterServer, Row, SamplingParams, UnknownModelError
from test_serving import save_adapter

pytest.importorskip("fastapi")  # the package imports without it; its routes need it
from ftengine.server.models import (  # noqa: E402
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_messages,
    parse_body,
    prompts_of,
    sampling_params,
)
from ftengine.server.scheduler import QueueFull, Scheduler, StreamTicket, Ticket  # noqa: E402

PROMPTS = ["Reverse: alpha", "Hi", "Reverse: the longest prompt"]
GREEDY = SamplingParams(max_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    adapter = save_adapter(tiny_model_dir, tmp_path_factory.mktemp("modules") / "r4", ["lora"], {"lora": {"r": 4}})
    return AdapterServer(str(tiny_model_dir), {"r4": adapter}, max_batch_size=8)


@contextlib.contextmanager
def scheduling(engine, max_queue=8):
    scheduler = Scheduler(engine, max_queue=max_queue, max_batch_size=engine.max_batch_size, batch_window_s=0)
    yield scheduler
    if scheduler.thread.is_alive():
        scheduler.stop()


def collect(items, timeout=60):
    """Everything a ticket was handed, up to its end (``None``)."""
    got = []
    while (item := items.get(timeout=timeout)) is not None:
        got.append(item)
        if isinstance(item, Exception):
            break
    return got


# --------------------------------------------------------------------------------------------
# models: request bodies and bounds, no server
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status", "param", "words"),
    [
        (b"{not json", 400, None, "not valid JSON"),
        (b"[1, 2]", 400, None, "must be a JSON object"),
        (b'{"prompt": "Hi"}', 400, "model", "model"),
        (b'{"model": "m", "prompt": "Hi", "n": 2}', 400, "n", "n:"),
        (b'{"model": "m", "prompt": {"a": 1}}', 400, "prompt", "prompt"),
    ],
)
def test_23_models_refuse_a_bad_body_with_openai_error(raw, status, param, words):
    with pytest.raises(ApiError) as caught:
        parse_body(raw, CompletionRequest)
    assert (caught.value.status, caught.value.param) == (status, param) and words in caught.value.message
    assert caught.value.body()["error"]["type"] == "invalid_request_error"


def test_23_models_parse_openai_fields_and_ignore_unknown_ones():
    body = parse_body(b'{"model": "r4", "messages": [{"role": "user", "content": "Hi"}], "logit_bias": {}}', ChatRequest)
    assert (body.model, body.temperature, body.stream) == ("r4", 1.0, False)
    with pytest.raises(ApiError, match="messages"):
        parse_body(b'{"model": "r4", "messages": []}', ChatRequest)


def test_23_sampling_keeps_the_cap_and_the_context():
    def body(**fields):
        return CompletionRequest(model="m", prompt="Hi", **fields)

    bounds = {"context_length": 100, "max_tokens_cap": 64}
    with pytest.raises(ApiError, match="over this server's cap of 64") as caught:
        sampling_params(body(max_tokens=65), [3], default_max_tokens=16, **bounds)
    assert caught.value.param == "max_tokens"
    assert sampling_params(body(), [3], default_max_tokens=16, **bounds).max_tokens == 16
    assert sampling_params(body(), [3], default_max_tokens=None, **bounds).max_tokens == 64  # the cap
    assert sampling_params(body(), [90], default_max_tokens=None, **bounds).max_tokens == 10  # what the context leaves
    assert sampling_params(body(stop="\n"), [3], default_max_tokens=16, **bounds).stop == ("\n",)
    with pytest.raises(FtengineError, match="top_p"):  # the engine's own checks still apply
        sampling_params(body(top_p=0), [3], default_max_tokens=16, **bounds)


def test_23_prompts_are_bounded_by_the_batch_size():
    assert prompts_of(CompletionRequest(model="m", prompt=[1, 2, 3]), max_batch_size=2) == [[1, 2, 3]]
    assert prompts_of(CompletionRequest(model="m", prompt=["a", "b"]), max_batch_size=2) == ["a", "b"]
    with pytest.raises(ApiError, match="3 prompts in one request; at most 2") as caught:
        prompts_of(CompletionRequest(model="m", prompt=["a", "b", "c"]), max_batch_size=2)
    assert caught.value.param == "prompt"


def test_23_chat_messages_join_text_parts_and_refuse_unknown_roles():
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert chat_messages(messages) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(ApiError, match=r"messages.0.role: 'robot' is not a chat role"):
        chat_messages([{"role": "robot", "content": "Hi"}])
    with pytest.raises(ApiError, match="messages.0.content"):
        chat_messages([{"role": "user", "content": 7}])


def test_23_api_error_keeps_the_engine_status():
    error = ApiError.of(UnknownModelError("no such adapter", param="model"))
    assert (error.status, error.body()["error"]["code"]) == (404, "model_not_found")
    assert ApiError.of(RuntimeError("boom")).status == 500


# --------------------------------------------------------------------------------------------
# scheduler: the real engine, no HTTP
# --------------------------------------------------------------------------------------------


def test_23_scheduler_batches_requests_together_and_routes_each_its_rows(engine):
    expected = engine.generate(PROMPTS, adapters=[None, "r4", "r4"], max_tokens=6, temperature=0)
    outputs = [queue.Queue(), queue.Queue()]
    tickets = [
        Ticket([engine.row(engine.encode(PROMPTS[0]), None, GREEDY)], outputs[0].put),
        Ticket([engine.row(engine.encode(p), "r4", GREEDY, index=i) for i, p in enumerate(PROMPTS[1:])], outputs[1].put),
    ]
    with scheduling(engine) as scheduler:
        for ticket in tickets:  # both wait before the thread starts: one batch
            scheduler.submit(ticket)
        scheduler.start()
        deltas = [collect(output) for output in outputs]
        stats = scheduler.snapshot()
    texts = [["".join(d.text for d in ds if d.index == i) for i in range(len(t.rows))] for ds, t in zip(deltas, tickets)]
    assert texts == [[expected[0].text], [expected[1].text, expected[2].text]]
    assert all(t.finished and t.done for t in tickets)
    assert (stats["batches"], stats["requests"]) == (1, 2) and stats["shared_forwards"] > 0
    assert (stats["max_batch_rows"], stats["max_batch_adapters"]) == (3, 2)
    # The engine's rows know nothing of tickets: nothing was attached to them.
    fields = {f.name for f in dataclasses.fields(Row)}
    assert all(set(vars(row)) == fields for t in tickets for row in t.rows)


def test_23_scheduler_refuses_past_its_queue(engine):
    with scheduling(engine, max_queue=1) as scheduler:  # not started: nothing leaves the queue
        scheduler.submit(Ticket([engine.row([1, 2], None, GREEDY)], print))
        with pytest.raises(QueueFull):
            scheduler.submit(Ticket([engine.row([1, 2], None, GREEDY)], print))
        assert scheduler.snapshot()["waiting"] == 1


def test_23_a_failed_batch_fails_its_request_not_the_scheduler(engine):
    broken = Row([len(engine.tokenizer) + 5], None, GREEDY)  # past the vocabulary: the forward raises
    failed, after = queue.Queue(), queue.Queue()
    with scheduling(engine) as scheduler:
        scheduler.start()
        scheduler.submit(Ticket([broken], failed.put))
        assert isinstance(failed.get(timeout=60), IndexError)
        scheduler.submit(Ticket([engine.row(engine.encode("Hi"), None, GREEDY)], after.put))
        assert collect(after)[-1].finish_reason == "length"


def test_23_stream_ticket_hands_deltas_to_asyncio_and_cancels_when_abandoned(engine):
    long = SamplingParams(max_tokens=40, temperature=0)

    async def first_delta_then_leave(scheduler):
        ticket = StreamTicket([engine.row(engine.encode("Hi"), None, long)])
        scheduler.submit(ticket)
        async with contextlib.aclosing(ticket.deltas()) as deltas:
            async for delta in deltas:
                return ticket, delta

    with scheduling(engine) as scheduler:
        scheduler.start()
        ticket, delta = asyncio.run(first_delta_then_leave(scheduler))
        deadline = time.monotonic() + 60
        while scheduler.snapshot()["cancelled_rows"] < 1:
            assert time.monotonic() < deadline, "the abandoned row kept generating"
            time.sleep(0.01)
    assert delta.text and ticket.rows[0].cancelled
    assert ticket.rows[0].finish_reason == "cancelled" and len(ticket.rows[0].token_ids) < 40


def test_23_every_core_subpackage_is_in_the_wheel():
    """Editable installs find ``ftengine.server`` anyway; a wheel only holds the packages listed."""
    import tomllib

    root = Path(__file__).parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    subpackages = {f"ftengine.{p.parent.name}" for p in (root / "core").glob("*/__init__.py")}
    assert "ftengine.server" in subpackages and subpackages <= listed
