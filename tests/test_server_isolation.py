"""Issue 26: adapters loaded on demand from ``--adapter-dir``, and one request, one adapter or
one client never failing the others. A real uvicorn on loopback, the official ``openai``
client and raw HTTP, over the tiny model."""

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from ftengine.serving import AdapterServer, RequestError, SamplingParams
from safetensors.torch import load_file, save_file
from test_server import get_json, post, running, wait_for
from test_serving import save_adapter

openai = pytest.importorskip("openai")
from ftengine.server import create_app  # noqa: E402  (needs fastapi, skipped above without the extra)

ON_DEMAND = [f"a{i}" for i in range(6)]


def variant(source, path, seed, alpha=None, poison=False):
    """A copy of the adapter directory ``source`` at ``path`` whose weights get their own seeded
    noise (so its answers differ from the others'); ``alpha`` overrides ``lora_alpha``, ``poison``
    puts a NaN in one tensor."""
    shutil.copytree(source, path)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    generator = torch.Generator().manual_seed(seed)
    tensors = {key: t + 0.3 * torch.randn(t.shape, generator=generator) for key, t in tensors.items()}
    if poison:
        first = sorted(tensors)[0]
        tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    if alpha is not None:
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
    return path


@pytest.fixture(scope="module")
def adapter_root(tiny_model_dir, tmp_path_factory):
    """``root/adapters/``: six good adapters and three broken ones; ``root/outside``: a good
    adapter outside it, reached from inside by the symlink ``adapters/escape``."""
    root = tmp_path_factory.mktemp("isolation")
    source = save_adapter(tiny_model_dir, root / "source", ["lora"], {"lora": {"r": 4}})
    folder = root / "adapters"
    folder.mkdir()
    for i, name in enumerate(ON_DEMAND):
        variant(source, folder / name, seed=i)
    variant(source, folder / "huge_alpha", seed=10, alpha=1e308)
    variant(source, folder / "nan_weights", seed=11, poison=True)
    (folder / "no_config").mkdir()
    variant(source, root / "outside", seed=12)
    (folder / "escape").symlink_to(root / "outside", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_root):
    """Every good adapter loaded at start: the offline answers to compare with."""
    return AdapterServer(str(tiny_model_dir), {n: adapter_root / "adapters" / n for n in ON_DEMAND})


def offline(engine, adapter, prompt="Hi", max_tokens=5):
    return engine.generate([prompt], adapters=[adapter], max_tokens=max_tokens, temperature=0)[0].text


# --------------------------------------------------------------------------------------------
# --adapter-dir: loaded on first request, least recently used evicted
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def on_demand(tiny_model_dir, adapter_root):
    engine = AdapterServer(str(tiny_model_dir), adapter_dir=adapter_root / "adapters", max_loaded_adapters=2, max_batch_size=4)
    with running(create_app(engine, base_name="base")) as url:
        yield engine, url


def test_six_adapters_on_demand_with_two_loaded_answer_as_offline_while_evicting(on_demand, reference):
    engine, url = on_demand
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["base", *ON_DEMAND, "huge_alpha", "nan_weights"]
    assert engine.adapters == {}, "nothing loads before its first request"
    expected = {name: offline(reference, name) for name in ON_DEMAND}
    assert len(set(expected.values())) == len(ON_DEMAND), "each adapter must answer differently"
    jobs = [ON_DEMAND[i % 6] for i in (0, 1, 2, 0, 3, 4, 5, 1, 2, 3, 4, 5)]

    def ask(name):
        return client.completions.create(model=name, prompt="Hi", max_tokens=5, temperature=0).choices[0].text

    with ThreadPoolExecutor(4) as pool:  # concurrent first requests for one adapter load it once
        answers = list(pool.map(ask, jobs))
    assert answers == [expected[name] for name in jobs]
    stats = get_json(url, "/v1/stats")
    assert stats["evictions"] >= 4 and stats["loaded_adapters"] <= 2, stats
    assert len(engine.adapters) <= 2
    assert offline(engine, "a0") == expected["a0"]  # the in-process API loads on demand too


@pytest.mark.parametrize(
    "name, status, message",
    [
        ("../outside", 400, "'../outside' is not an adapter folder name"),
        ("escape", 400, "outside the adapter directory"),
        ("missing", 404, "the model 'missing' does not exist"),
        ("huge_alpha", 400, "lora_alpha 1e+308 with r 4 gives the scale"),
        ("nan_weights", 400, "holds NaN or infinite weights"),
        ("no_config", 400, "adapter_config.json: not found"),
    ],
)
def test_bad_or_broken_adapter_names_fail_their_request_only(on_demand, reference, name, status, message):
    engine, url = on_demand
    got, _, text = post(url, "/v1/completions", {"model": name, "prompt": "Hi", "max_tokens": 3, "temperature": 0})
    error = json.loads(text)["error"]
    assert got == status and message in error["message"] and error["param"] == "model", text
    assert name not in engine.adapters
    for model, adapter in (("base", None), ("a5", "a5")):
        body = {"model": model, "prompt": "Hi", "max_tokens": 5, "temperature": 0}
        got, _, text = post(url, "/v1/completions", body)
        assert got == 200 and json.loads(text)["choices"][0]["text"] == offline(reference, adapter), text


# --------------------------------------------------------------------------------------------
# adapters named at start or loaded by the API
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pinned(tiny_model_dir, adapter_root):
    engine = AdapterServer(str(tiny_model_dir), {"a0": adapter_root / "adapters" / "a0"}, max_batch_size=4)
    app = create_app(engine, allow_adapter_loading=True, base_name="base")
    with running(app) as url:
        yield engine, url


@pytest.mark.parametrize("broken", ["huge_alpha", "nan_weights"])
def test_an_adapter_that_fails_to_load_leaves_nothing_registered(pinned, adapter_root, reference, broken):
    engine, url = pinned
    status, _, text = post(
        url, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(adapter_root / "adapters" / broken)}
    )
    assert status == 400 and broken in json.loads(text)["error"]["message"], text
    assert list(engine.adapters) == ["a0"]
    assert [m["id"] for m in get_json(url, "/v1/models")["data"]] == ["base", "a0"]
    for model, adapter in (("base", None), ("a0", "a0")):
        got, _, text = post(url, "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 5, "temperature": 0})
        assert got == 200 and json.loads(text)["choices"][0]["text"] == offline(reference, adapter), text


def test_unloading_an_adapter_a_queued_request_uses_is_refused_and_nobody_fails(pinned, reference, adapter_root, monkeypatch):
    engine, url = pinned
    assert post(url, "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": str(adapter_root / "adapters" / "a1")})[0] == 200
    # The first request (the base) waits at a gate in its first step, so the next two requests
    # queue behind it; they join its batch once the gate opens.
    gate, sample_rows, calls = threading.Event(), engine._sample_rows, []

    def first_step_waits_at_the_gate(rows, logits):
        calls.append(rows)
        if len(calls) == 1:
            assert gate.wait(timeout=30), "the test never opened the gate"
        return sample_rows(rows, logits)

    monkeypatch.setattr(engine, "_sample_rows", first_step_waits_at_the_gate)
    body = {"prompt": "Hi", "max_tokens": 5, "temperature": 0}
    with ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(post, url, "/v1/completions", {**body, "model": "base"})
        wait_for(lambda: len(calls) == 1)
        innocent = pool.submit(post, url, "/v1/completions", {**body, "model": "base"})
        queued = pool.submit(post, url, "/v1/completions", {**body, "model": "a1"})
        wait_for(lambda: get_json(url, "/v1/stats")["waiting"] == 2)
        status, _, text = post(url, "/v1/unload_lora_adapter", {"lora_name": "a1"})
        gate.set()
        results = [future.result() for future in (blocker, innocent, queued)]
    assert status == 409 and "1 in-flight request" in json.loads(text)["error"]["message"], text
    assert [r[0] for r in results] == [200, 200, 200], results
    texts = [json.loads(r[2])["choices"][0]["text"] for r in results]
    assert texts == [offline(reference, None), offline(reference, None), offline(reference, "a1")]
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "a1"})[0] == 200  # once it finished


# --------------------------------------------------------------------------------------------
# every error answers in OpenAI's JSON shape
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, raw, status, param, message",
    [
        ("/v1/completions", b'{"model": "base", "prompt": "Hi", "seed": 1180591620717411303424}', 400, "seed", "seed: "),
        ("/v1/completions", b'{"model": "base", "prompt": "a\\ud800b"}', 400, "prompt", "lone surrogate"),
        (
            "/v1/chat/completions",
            b'{"model": "base", "messages": [{"role": "user", "content": "\\udfff"}]}',
            400,
            "messages",
            "lone surrogate",
        ),
        ("/v1/completions", b'{"model": "\\ud800", "prompt": "Hi"}', 400, "model", "lone surrogate"),
        ("/v1/nowhere", b"{}", 404, None, "Not Found"),
    ],
)
def test_inputs_that_gave_a_plain_text_500_get_openai_errors(pinned, path, raw, status, param, message):
    engine, url = pinned
    got, headers, text = post(url, path, None, raw)
    assert headers["content-type"] == "application/json", text
    error = json.loads(text)["error"]
    assert got == status and error["param"] == param and message in error["message"], text
    assert set(error) == {"message", "type", "param", "code"}
    assert post(url, "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 2})[0] == 200


def test_an_unexpected_exception_is_a_500_in_json_shape(pinned, monkeypatch):
    engine, url = pinned

    def fails(*args, **kwargs):  # a bug anywhere in a request: fault injection, not a stubbed model
        raise RuntimeError("an unforeseen failure")

    monkeypatch.setattr(engine, "encode", fails)
    got, headers, text = post(url, "/v1/completions", {"model": "base", "prompt": "Hi"})
    assert got == 500 and headers["content-type"] == "application/json", text
    error = json.loads(text)["error"]
    assert error["type"] == "server_error" and "RuntimeError: an unforeseen failure" in error["message"]


def test_the_in_process_api_refuses_the_same_inputs(pinned):
    engine, _ = pinned
    with pytest.raises(RequestError, match="seed: 1180591620717411303424 is not valid"):
        SamplingParams(seed=2**70)
    with pytest.raises(RequestError, match="lone surrogate"):
        engine.generate(["a\ud800"], max_tokens=2)
