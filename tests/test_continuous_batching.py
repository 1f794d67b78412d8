"""Continuous batching: rows join a running batch at any step and leave the moment they finish,
every greedy answer equals offline generation, one failing row (or client) fails nobody else,
and the server's counters show it (``/v1/stats``). Real tiny model, real uvicorn, real client."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from ftengine.serving import AdapterServer, GenerationError, RequestError, SamplingParams
from test_serving import save_adapter

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from ftengine.server import create_app  # noqa: E402  (needs fastapi, skipped above without the extra)
from test_server import get_json, post, running, wait_for  # noqa: E402

PROMPTS = ["Reverse: alpha", "Hi", "Reverse: the longest prompt", "abc", "x", "Reverse: beta"]
ADAPTERS = ["a", "b", None, "a", "b", None]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("continuous")
    paths = {
        name: save_adapter(tiny_model_dir, root / name, ["lora"], {"lora": {"r": 4}}, seed=seed)
        for seed, name in enumerate(["a", "b", "nan"])
    }
    server = AdapterServer(str(tiny_model_dir), paths, max_batch_size=8)
    # Loading refuses non-finite weights, so the broken adapter is broken in memory: its rows'
    # logits are NaN, as an adapter whose activations overflow would give.
    from ftengine.plugins.lora.layer import lora_layers

    with torch.no_grad():
        for _, layer in lora_layers(server.model):
            if "nan" in layer.lora_B:
                layer.lora_B["nan"].weight.fill_(float("nan"))
                layer._stack = None
    server.eos_ids = set()  # rows run to max_tokens: the lengths below are exact
    return server


def offline(engine, prompt, adapter, max_tokens):
    return engine.generate([prompt], adapters=[adapter], max_tokens=max_tokens, temperature=0)[0]


# --------------------------------------------------------------------------------------------
# the engine: rows join and leave a running batch
# --------------------------------------------------------------------------------------------


def test_rows_joining_and_leaving_a_running_batch_keep_their_offline_greedy_tokens(engine):
    lengths = [9, 3, 7, 5, 2, 6]  # rows leave at different steps
    expected = [offline(engine, p, a, n).token_ids for p, a, n in zip(PROMPTS, ADAPTERS, lengths)]
    batch = engine.batch()
    rows = [
        engine.row(engine.encode(p), a, SamplingParams(max_tokens=n, temperature=0))
        for p, a, n in zip(PROMPTS, ADAPTERS, lengths)
    ]
    batch.admit(rows[:2])
    for _ in range(2):
        list(batch.step())
    batch.admit(rows[2:4])  # join a batch that has decoded two steps
    list(batch.step())
    batch.admit(rows[4:])  # and one whose first rows have left
    while batch:
        list(batch.step())
    batch.close()
    assert [row.token_ids for row in rows] == expected
    assert all(row.finish_reason == "length" for row in rows)
    assert engine.stats()["rows_admitted_mid_batch"] >= 4


def test_a_row_with_nan_logits_fails_alone_and_its_batch_goes_on(engine):
    expected = [offline(engine, p, a, 6).token_ids for p, a in zip(PROMPTS[:3], ADAPTERS[:3])]
    batch = engine.batch()
    healthy = [
        engine.row(engine.encode(p), a, SamplingParams(max_tokens=6, temperature=0)) for p, a in zip(PROMPTS, ADAPTERS[:3])
    ]
    broken = [
        engine.row(engine.encode("Hi"), "nan", SamplingParams(max_tokens=6, temperature=0)),
        engine.row(engine.encode("Hi"), "nan", SamplingParams(max_tokens=6, temperature=1.0, seed=1)),  # sampling raised here
    ]
    batch.admit([healthy[0], broken[0], healthy[1], broken[1], healthy[2]])
    while batch:
        list(batch.step())
    batch.close()
    assert [row.token_ids for row in healthy] == expected
    for row in broken:
        assert row.finish_reason == "error" and isinstance(row.error, GenerationError)
        assert "adapter 'nan'" in str(row.error) and "not finite" in str(row.error)
    with pytest.raises(GenerationError, match="adapter 'nan'"):
        engine.generate(["Hi"], adapters=["nan"], max_tokens=3)


def test_setting_the_rows_copies_no_adapter_weights(engine):
    """A row joining or leaving costs its index, not a copy of every row's A and B (which made
    each change of the rows cost more than a decode step): what a LoRA layer keeps for its rows
    is views of its adapter stack, or at most a few numbers per row."""
    from ftengine.plugins.lora.layer import lora_layers

    names = ["a", "b", None, "a", "b", "a", None, "b"]
    try:
        engine._set_rows(names)
        for path, layer in lora_layers(engine.model):
            stack = layer.adapter_stack()
            stack_storages = {t.untyped_storage().data_ptr() for t in stack if isinstance(t, torch.Tensor)}
            kept = [t for t in _tensors(layer._rows) if t.untyped_storage().data_ptr() not in stack_storages]
            assert all(t.numel() <= len(names) for t in kept), (path, [tuple(t.shape) for t in kept])
    finally:
        engine._set_rows(None)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []


@pytest.mark.parametrize("field, value", [("temperature", 1e-300), ("top_p", 1e-300)])
def test_sampling_parameters_that_cannot_be_sampled_are_refused(field, value):
    with pytest.raises(RequestError, match=f"{field}: 1e-300 is not valid"):
        SamplingParams(**{field: value})


# --------------------------------------------------------------------------------------------
# the server: joins within one step, isolation, cancellation, counters
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url(engine):
    with running(create_app(engine, max_tokens_cap=400, base_name="base")) as base_url:
        yield base_url


def test_requests_arriving_while_others_decode_join_within_one_step_and_equal_offline(engine, url, monkeypatch):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    jobs = [(PROMPTS[i], ADAPTERS[i] or "base", 8 + 4 * i) for i in range(6)]
    expected = [offline(engine, p, None if m == "base" else m, n).text for p, m, n in jobs]
    before = get_json(url, "/v1/stats")
    # A warm tiny model decodes a request faster than the next one arrives: every step takes
    # at least 20 ms here, so each request is still decoding when the next one comes.
    sample_rows = engine._sample_rows
    monkeypatch.setattr(engine, "_sample_rows", lambda rows, logits: time.sleep(0.02) or sample_rows(rows, logits))

    def ask(i):
        time.sleep(0.15 * i)  # staggered: later requests arrive while earlier ones decode
        prompt, model, max_tokens = jobs[i]
        return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, range(len(jobs))))
    assert answers == expected
    after = get_json(url, "/v1/stats")
    assert after["rows_admitted_mid_batch"] > before["rows_admitted_mid_batch"], after
    assert after["max_admission_wait_steps"] <= 1, after  # nobody waited for another's completion
    assert after["loaded_adapters"] == 3 and after["evictions"] == 0 and after["tokens_per_s"] > 0
    assert after["steps"] > before["steps"] and after["running_rows"] == 0 and after["waiting"] == 0


def test_a_nan_adapter_request_gets_a_clear_error_and_the_request_beside_it_its_answer(engine, url):
    body = {"prompt": "Hi", "max_tokens": 30, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(post, url, "/v1/completions", {**body, "model": "a"})
        time.sleep(0.05)
        bad = pool.submit(post, url, "/v1/completions", {**body, "model": "nan"})
        status, _, text = bad.result()
        assert status == 500 and "adapter 'nan'" in json.loads(text)["error"]["message"], text
        status, _, text = good.result()
    assert status == 200 and json.loads(text)["choices"][0]["text"] == offline(engine, "Hi", "a", 30).text
    status, _, text = post(url, "/v1/completions", {**body, "model": "a", "temperature": 1e-300})
    assert status == 400 and "temperature" in json.loads(text)["error"]["message"]


def test_a_client_that_disconnects_before_a_non_streaming_answer_frees_its_row(url):
    before = get_json(url, "/v1/stats")["cancelled_rows"]
    request = json.dumps({"model": "a", "prompt": "Hi", "max_tokens": 400, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        conn.sendall(f"Content-Length: {len(request)}\r\n\r\n".encode() + request)
        wait_for(lambda: get_json(url, "/v1/stats")["running_rows"] == 1)
    started = time.monotonic()
    wait_for(lambda: get_json(url, "/v1/stats")["cancelled_rows"] == before + 1, timeout=30)
    assert time.monotonic() - started < 5 and get_json(url, "/v1/stats")["running_rows"] == 0


def test_stats_in_process_name_every_counter(engine):
    stats = engine.stats()
    expected = {"steps", "forwards", "generated_tokens", "tokens_per_s", "rows_admitted", "rows_admitted_mid_batch"}
    expected |= {"running_rows", "cancelled_rows", "failed_rows", "loaded_adapters", "evictions"}
    assert expected <= set(stats) and stats["loaded_adapters"] == 3
    engine.evictions += 1  # the counter adapter eviction increments
    try:
        assert engine.stats()["evictions"] == 1
    finally:
        engine.evictions -= 1


def test_the_scheduler_thread_survives_a_batch_whose_step_raises(engine, url, monkeypatch):
    failing = threading.Event()
    original = type(engine.batch()).step

    def step(batch):
        if failing.is_set():
            failing.clear()
            raise RuntimeError("boom")
        return original(batch)

    monkeypatch.setattr(type(engine.batch()), "step", step)
    failing.set()
    status, _, text = post(url, "/v1/completions", {"model": "a", "prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert status == 500 and "boom" in text
    assert post(url, "/v1/completions", {"model": "a", "prompt": "Hi", "max_tokens": 3, "temperature": 0})[0] == 200


def test_a_failed_rows_error_ends_its_request_only_once_its_other_rows_have_left(engine):
    """The end of a request releases the adapter it holds, which eviction or unload may then
    take: so a failed row's error is delivered only after the request's other rows (cancelled
    by it) have left the batch, not while they still run with the adapter."""
    import queue

    from ftengine.server.scheduler import Scheduler, Ticket

    at_end, items = [], queue.Queue()

    def deliver(item):
        if item is None or isinstance(item, Exception):
            at_end.append(([row.finish_reason for row in ticket.rows], engine._in_use.get("a")))
        items.put(item)

    long_row = engine.row(engine.encode("Hi"), "a", SamplingParams(max_tokens=50, temperature=0))
    ticket = Ticket([long_row, engine.row(engine.encode("Hi"), "nan", SamplingParams(max_tokens=50), index=1)], deliver)
    scheduler = Scheduler(engine, max_queue=4, max_batch_size=engine.max_batch_size, batch_window_s=0)
    scheduler.submit(ticket)
    scheduler.start()
    try:
        while not isinstance(item := items.get(timeout=60), Exception):
            assert item is not None, "the failed row's error never came"
    finally:
        scheduler.stop()
    assert isinstance(item, GenerationError)
    assert at_end == [(["cancelled", "error"], 0)], at_end
