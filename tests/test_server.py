"""``ftengine serve``: a real uvicorn on a free loopback port, driven by the official ``openai``
client and by raw HTTP; the server stops by itself at the end of each test module."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ftengine.serving import AdapterServer
from test_serving import save_adapter

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from ftengine.server import create_app  # noqa: E402  (needs fastapi, skipped above without the extra)

ADAPTERS = {
    "r4": (["lora"], {"r": 4}),
    "dora": (["lora", "dora"], {"r": 4, "alpha": 16}),
    "qv": (["lora"], {"r": 2, "target_modules": ["q_proj", "v_proj"]}),
}
PROMPTS = ["Reverse: alpha", "Hi", "Reverse: the longest prompt", "abc", "x", "Reverse: beta", "ok", "zz"]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("server-adapters")
    return {
        name: save_adapter(tiny_model_dir, root / name, plugins, {"lora": lora}) for name, (plugins, lora) in ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_dirs):
    return AdapterServer(str(tiny_model_dir), adapter_dirs, max_batch_size=8)


@contextlib.contextmanager
def running(app):
    """``app`` on a real uvicorn bound to a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def url(engine):
    app = create_app(engine, allow_adapter_loading=True, max_tokens_cap=64, max_body_bytes=4096, base_name="base")
    with running(app) as base_url:
        yield base_url


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def post(url, path, body, raw=None):
    """``(status, headers, text)`` of a POST of ``body`` (JSON) or ``raw`` bytes."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def get_json(url, path):
    with urllib.request.urlopen(url + path, timeout=30) as response:
        return json.loads(response.read())


def offline(engine, prompt, adapter, max_tokens=6):
    return engine.generate([prompt], adapters=[adapter], max_tokens=max_tokens, temperature=0)[0].text


# --------------------------------------------------------------------------------------------
# the OpenAI API through the official client
# --------------------------------------------------------------------------------------------


def test_models_lists_the_base_and_each_adapter(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["base", "r4", "dora", "qv"]
    assert all(m.owned_by == "ftengine" for m in models.data)


def test_completion_and_chat_completion_equal_offline_greedy_output(client, engine):
    completion = client.completions.create(model="dora", prompt="Hi", max_tokens=6, temperature=0)
    assert completion.choices[0].text == offline(engine, "Hi", "dora")
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens == len(engine.encode("Hi")) and completion.usage.completion_tokens <= 6

    messages = [{"role": "user", "content": "Reverse: alpha"}]
    chat = client.chat.completions.create(model="qv", messages=messages, max_tokens=5, temperature=0)
    expected = engine.generate([engine.encode(messages, chat=True)], adapters=["qv"], max_tokens=5, temperature=0)[0]
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == expected.text
    assert chat.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens

    base = client.completions.create(model="base", prompt="Hi", max_tokens=6, temperature=0)
    assert base.choices[0].text == offline(engine, "Hi", None) != completion.choices[0].text


def test_streaming_gives_the_same_text_in_pieces(client, engine):
    stream = client.completions.create(model="r4", prompt="Hi", max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == offline(engine, "Hi", "r4", 8)
    assert chunks[-1].choices[0].finish_reason is not None and len(chunks) > 2
    stream = client.chat.completions.create(
        model="dora",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (
        text
        == client.chat.completions.create(model="dora", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0)
        .choices[0]
        .message.content
    )


def test_raw_sse_framing(url):
    status, headers, text = post(
        url, "/v1/completions", {"model": "qv", "prompt": "Hi", "max_tokens": 4, "temperature": 0, "stream": True}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert all(p["object"] == "text_completion" and p["model"] == "qv" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_eight_concurrent_requests_over_three_adapters_share_batches_and_equal_offline_output(client, engine, url):
    jobs = [(PROMPTS[i], ["r4", "dora", "qv"][i % 3]) for i in range(8)]
    expected = [offline(engine, prompt, adapter) for prompt, adapter in jobs]
    before = get_json(url, "/v1/stats")
    barrier = threading.Barrier(len(jobs))

    def ask(job):
        barrier.wait()
        return client.completions.create(model=job[1], prompt=job[0], max_tokens=6, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == expected
    after = get_json(url, "/v1/stats")
    assert after["shared_forwards"] > before["shared_forwards"], after
    assert after["max_batch_adapters"] >= 2, after


# --------------------------------------------------------------------------------------------
# errors: OpenAI's shape, the right status, and the server keeps serving
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, raw, status, message",
    [
        ("/v1/completions", {"model": "nope", "prompt": "Hi"}, None, 404, "the model 'nope' does not exist"),
        ("/v1/completions", None, b'{"model": "r4", "prompt": ', 400, "not valid JSON"),
        ("/v1/completions", {"model": "r4", "prompt": "Hi", "max_tokens": -1}, None, 400, "max_tokens: -1 is not valid"),
        ("/v1/completions", {"model": "r4", "prompt": "Hi", "max_tokens": 65}, None, 400, "over this server's cap of 64"),
        ("/v1/completions", {"model": "r4"}, None, 400, "prompt: Field required"),
        (
            "/v1/completions",
            {"model": "r4", "prompt": "x" * 500, "max_tokens": 64},
            None,
            400,
            "this model's context is 512 tokens",
        ),
        ("/v1/completions", {"model": "r4", "prompt": "x" * 5000}, None, 413, "this server takes at most 4096"),
        (
            "/v1/chat/completions",
            {"model": "r4", "messages": [{"role": "robot", "content": "x"}]},
            None,
            400,
            "'robot' is not a chat role",
        ),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(url, engine, path, body, raw, status, message):
    got, _, text = post(url, path, body, raw)
    error = json.loads(text)["error"]
    assert got == status and message in error["message"], text
    assert set(error) == {"message", "type", "param", "code"}
    assert post(url, "/v1/completions", {"model": "r4", "prompt": "Hi", "max_tokens": 3, "temperature": 0})[0] == 200


def test_the_client_raises_openais_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="the model 'nope' does not exist"):
        client.completions.create(model="nope", prompt="Hi")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="r4", prompt="Hi", max_tokens=-3)


def test_adapters_load_and_unload_while_serving(url, client, adapter_dirs, tiny_model_dir, tmp_path):
    status, _, text = post(url, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(adapter_dirs["r4"])})
    assert status == 200 and "extra" in text
    assert "extra" in [m.id for m in client.models.list().data]
    same = [client.completions.create(model=m, prompt="Hi", max_tokens=5, temperature=0).choices[0].text for m in ("extra", "r4")]
    assert same[0] == same[1]
    from ftengine.testing import save_tiny_model

    wide = save_adapter(
        save_tiny_model(tmp_path / "wide", hidden_size=48), tmp_path / "wide-adapter", ["lora"], {"lora": {"r": 4}}
    )
    status, _, text = post(url, "/v1/load_lora_adapter", {"lora_name": "wide", "lora_path": str(wide)})
    assert status == 400 and "wide-adapter" in json.loads(text)["error"]["message"]
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "extra"})[0] == 200
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "extra"})[0] == 404
    assert [m.id for m in client.models.list().data] == ["base", "r4", "dora", "qv"]
    assert client.completions.create(model="r4", prompt="Hi", max_tokens=5, temperature=0).choices[0].text == same[1]


def test_limits_adapter_loading_off_full_queue_and_a_client_that_goes_away(engine, adapter_dirs, monkeypatch):
    app = create_app(engine, max_queue=1, base_name="base")
    with running(app) as url:
        status, _, text = post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(adapter_dirs["r4"])})
        assert status == 403 and "--allow-adapter-loading" in text
        body = {"model": "r4", "prompt": "Hi", "max_tokens": 4, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            with engine._lock:  # the scheduler stalls at its next forward
                first = pool.submit(post, url, "/v1/completions", body)
                wait_for(lambda: get_json(url, "/v1/stats")["batches"] == 1)
                second = pool.submit(post, url, "/v1/completions", body)
                wait_for(lambda: get_json(url, "/v1/stats")["waiting"] == 1)
                status, headers, text = post(url, "/v1/completions", body)
                assert status == 503 and headers["Retry-After"] == "1" and "--max-queue" in text
            assert first.result()[0] == second.result()[0] == 200

        # A streaming client that disconnects: its row leaves the batch (cancelled), not at max_tokens.
        # The engine pauses after its first sampling (the prefill) until the server has seen the
        # client go: taking engine._lock after the first chunk raced the scheduler, which re-takes
        # that (unfair) lock step after step and could finish all 400 tokens first on a busy machine.
        gate, streamed_rows, sample_rows = threading.Event(), [], engine._sample_rows

        def sample_then_wait_at_the_gate(rows, logits):
            deltas = sample_rows(rows, logits)
            if streamed_rows:
                assert gate.wait(timeout=30), "the test never opened the gate"
            streamed_rows.extend(rows)
            return deltas

        monkeypatch.setattr(engine, "_sample_rows", sample_then_wait_at_the_gate)
        request = json.dumps({**body, "max_tokens": 400, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            conn.sendall(f"Content-Length: {len(request)}\r\n\r\n".encode() + request)
            received = b""
            while b"data: " not in received:
                received += conn.recv(4096)
            assert get_json(url, "/v1/stats")["running_rows"] == 1
            conn.shutdown(socket.SHUT_RDWR)
            wait_for(lambda: streamed_rows[0].cancelled)  # the server saw the client go
        gate.set()
        wait_for(lambda: get_json(url, "/v1/stats")["cancelled_rows"] == 1)
        assert get_json(url, "/v1/stats")["running_rows"] == 0
        assert streamed_rows[0].finish_reason == "cancelled" and len(streamed_rows[0].token_ids) <= 2  # prefill, one decode


def wait_for(condition, timeout=20):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# the command: SIGTERM drains in-flight requests
# --------------------------------------------------------------------------------------------


def test_serve_command_drains_in_flight_requests_on_sigterm_within_the_shutdown_timeout(tiny_model_dir, adapter_dirs):
    """A stream in flight finishes; a client that sent half a body is dropped once
    --shutdown-timeout has passed (without the bound, the server never exited)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(Path(sys.executable).parent / "ftengine"), "serve", "--model", str(tiny_model_dir), "--port", str(port)]
    command += ["--adapter", f"dora={adapter_dirs['dora']}", "--shutdown-timeout", "3"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            assert process.poll() is None, process.stdout.read().decode()
            try:
                return get_json(url, "/v1/models")["data"][1]["id"] == "dora"
            except OSError:
                return False

        wait_for(ready, timeout=60)
        request = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps({"model": "dora", "prompt": "Hi", "max_tokens": 40, "temperature": 0, "stream": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with socket.create_connection(("127.0.0.1", port)) as half:
            half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            half.sendall(b'Content-Length: 100\r\n\r\n{"model": "')
            with urllib.request.urlopen(request, timeout=60) as response:
                first = response.readline()
                process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                rest = response.read().decode()
            assert first.startswith(b"data: ") and rest.endswith("data: [DONE]\n\n")
            try:
                # uvicorn shuts down gracefully, then re-raises the signal it captured: -SIGTERM.
                assert process.wait(timeout=20) in (0, -signal.SIGTERM)
            except subprocess.TimeoutExpired:
                pytest.fail("the server did not exit 20 s after SIGTERM (--shutdown-timeout 3)")
        assert time.monotonic() - signalled < 20
        output = process.stdout.read().decode()
        assert "timeout graceful shutdown exceeded" in output and "Finished server process" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_without_the_extra_says_what_to_install(monkeypatch):
    from click.testing import CliRunner
    from ftengine.cli import cli

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if 'ftengine[serve]' were not installed
    result = CliRunner().invoke(cli, ["serve", "--model", "unused"])
    assert result.exit_code == 2 and "pip install 'ftengine[serve]'" in " ".join(result.output.split())
    assert CliRunner().invoke(cli, ["--help"]).exit_code == 0


def test_serving_benchmark_smoke_runs_every_path(tmp_path):
    """examples/benchmarks/bench_serving.py on the tiny model: every configuration and the
    server under concurrent clients run (the timings mean nothing)."""
    script = Path(__file__).parent.parent / "examples" / "benchmarks" / "bench_serving.py"
    out = tmp_path / "serving.json"
    child = subprocess.run(
        [sys.executable, str(script), "--smoke", "--soak", "1", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and [row["configuration"] for row in result["decode"]] == [
        "base", "one adapter", "mixed 1", "mixed 2", "mixed 4", "mixed 8", "grouped", "naive",
    ]  # fmt: skip
    assert all(row["decode_tokens_per_s"] > 0 for row in result["decode"])
    assert [run["scheduler"] for run in result["server"]] == ["continuous", "static"]
    assert all(run["stats"]["shared_forwards"] > 0 and run["ttft_p50_s"] > 0 for run in result["server"])
    assert result["server"][0]["stats"]["rows_admitted_mid_batch"] > 0  # staggered clients joined running batches
    soak = result["soak"]
    assert soak["requests"] > soak["disconnected"] > 0 and soak["errors"] == soak["wrong_answers"] == 0
    assert len(result["goals"]) == 5 and "(smoke run: not meaningful)" in child.stdout
