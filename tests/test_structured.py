"""Structured outputs (``response_format``): sampled rows of a random tiny model, constrained by
llguidance, always give JSON that parses and validates (checked by ``jsonschema``, another
implementation); unsupported schemas are a 400 naming the keyword; unconstrained rows of the
same batch are unchanged. A real uvicorn on loopback, driven by the official ``openai`` client."""

import importlib.util
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ftengine.serving import AdapterServer, SamplingParams

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from ftengine.server import create_app  # noqa: E402  (needs fastapi, skipped above without the extra)
from ftengine.structured import MAX_SCHEMA_BYTES, ResponseFormatError  # noqa: E402
from test_server import post, running  # noqa: E402


def nullable(schema):
    return {"anyOf": [schema, {"type": "null"}]}


# The contacts task's record (ftengine_contacts.task: KEYS in order, null for what the message
# does not say, e-mail lowercased, phone E.164 +1, ISO date), with lengths bounded so that a
# random model's strings end within a few dozen tokens.
CONTACT_KEYS = ("name", "age", "city", "email", "phone", "date")
CONTACT_RECORD = {
    "type": "object",
    "properties": {
        "name": nullable({"type": "string", "minLength": 1, "maxLength": 20}),
        "age": nullable({"type": "integer", "minimum": 0, "maximum": 120}),
        "city": nullable({"type": "string", "minLength": 1, "maxLength": 20}),
        "email": nullable({"type": "string", "pattern": r"^[a-z0-9._+-]{1,12}@[a-z0-9-]{1,10}\.(com|org|net|example|test)$"}),
        "phone": nullable({"type": "string", "pattern": r"^\+1[2-9][0-9]{9}$"}),
        "date": nullable({"type": "string", "pattern": r"^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"}),
    },
    "required": list(CONTACT_KEYS),
    "additionalProperties": False,
}
# Nested objects, an array of objects, enums, optional keys and booleans.
ORDER = {
    "type": "object",
    "properties": {
        "status": {"enum": ["open", "shipped", "returned"]},
        "customer": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999}, "vip": {"type": "boolean"}},
            "required": ["id", "vip"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": r"^[A-Z]{3}-[0-9]{2}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    "size": {"enum": ["S", "M", "L", None]},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
        "note": {"type": "string", "maxLength": 6},
    },
    "required": ["status", "customer", "items"],
    "additionalProperties": False,
}
PROMPTS = ["Extract: Ann, 34, Oslo", "Hi", "Reverse: alpha", "abc", "x", "order 12", "ok", "zz", "Dear Bo", "q"]


def json_schema_format(name, schema):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return AdapterServer(str(tiny_model_dir), max_batch_size=10)


@pytest.fixture(scope="module")
def url(engine):
    with running(create_app(engine, max_tokens_cap=300, base_name="base")) as base_url:
        yield base_url


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_fifty_sampled_contact_records_all_validate(client):
    """5 requests of 10 prompts, sent together, at temperature 1: every row ends on its own
    (not at max_tokens), parses, validates and keeps the keys in the schema's order; the stop
    string "," would cut the JSON, so a constrained row ignores it."""
    response_format = json_schema_format("contact", CONTACT_RECORD)

    def ask(seed):
        return client.completions.create(
            model="base",
            prompt=PROMPTS,
            max_tokens=300,
            temperature=1.0,
            seed=seed,
            stop=[","],
            extra_body={"response_format": response_format},
        ).choices

    with ThreadPoolExecutor(5) as pool:
        choices = [choice for answer in pool.map(ask, range(5)) for choice in answer]
    assert len(choices) == 50
    assert [c.finish_reason for c in choices] == ["stop"] * 50, [c.text for c in choices if c.finish_reason != "stop"]
    records = [json.loads(c.text) for c in choices]
    for record in records:
        jsonschema.validate(record, CONTACT_RECORD)
        assert tuple(record) == CONTACT_KEYS
    assert len({c.text for c in choices}) > 40  # sampled, not one answer repeated
    assert {type(r["age"]) for r in records} == {int, type(None)}  # both branches of anyOf were taken


def test_nested_schema_through_chat_and_streaming(client):
    response_format = json_schema_format("order", ORDER)
    messages = [[{"role": "user", "content": prompt}] for prompt in PROMPTS[:8]]

    def ask(i):
        if i % 2:  # streamed: the pieces join into the same kind of answer
            chunks = list(
                client.chat.completions.create(
                    model="base",
                    messages=messages[i],
                    temperature=1.0,
                    max_tokens=300,
                    stream=True,
                    response_format=response_format,
                    seed=i,
                )
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        choice = client.chat.completions.create(
            model="base", messages=messages[i], temperature=1.0, max_tokens=300, response_format=response_format, seed=i
        ).choices[0]
        return choice.message.content, choice.finish_reason

    # Seeded, so reproducible: these rows end after 145-281 tokens; unseeded, one of the 8 ran
    # past max_tokens in about one run of five.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert [reason for _, reason in answers] == ["stop"] * 8, answers
    for text, _ in answers:
        jsonschema.validate(json.loads(text), ORDER)


def test_json_object_parses_and_unconstrained_greedy_rows_are_unchanged(engine):
    """One batch mixes greedy rows without a format, sampled json_object rows and a greedy
    json_object row: the free rows equal offline generation, every constrained row that ends
    parses as an object, and one cut by max_tokens says "length" (documented: its text is cut)."""
    free = [engine.encode(p) for p in PROMPTS[:3]]
    offline = [c.text for c in engine.generate(free, max_tokens=12, temperature=0)]
    json_object = engine.constraint({"type": "json_object"})
    greedy, sampled = SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=60, temperature=1.0, seed=3)
    rows = [engine.row(ids, None, greedy, index=i) for i, ids in enumerate(free)]
    constrained = [engine.row(engine.encode(p), None, sampled, constraint=json_object) for p in PROMPTS * 2]
    constrained.append(
        engine.row(engine.encode("Hi"), None, SamplingParams(max_tokens=60, temperature=0), constraint=json_object)
    )
    mixed = [row for pair in zip(rows, constrained) for row in pair] + constrained[len(rows) :]
    for _ in engine._run_all(mixed):
        pass
    assert [row.text for row in rows] == offline
    ended = [row for row in constrained if row.finish_reason == "stop"]
    assert len(ended) >= 5, [(r.finish_reason, r.text) for r in constrained]
    assert all(isinstance(json.loads(row.text), dict) for row in ended)
    assert all(row.finish_reason == "length" and len(row.token_ids) == 60 for row in constrained if row not in ended)
    # The in-process API takes the same argument.
    out = engine.generate(PROMPTS[:4], response_format={"type": "json_object"}, max_tokens=60, temperature=1.0, seed=5)
    assert all(isinstance(json.loads(c.text), dict) for c in out if c.finish_reason == "stop")


@pytest.mark.parametrize(
    "response_format, message",
    [
        (json_schema_format("tags", {"type": "array", "items": {"type": "string"}, "uniqueItems": True}), "uniqueItems"),
        (json_schema_format("bad", {"type": "string", "pattern": "(?=a)b"}), "look-around"),
        (json_schema_format("bad", {"$ref": "#/$defs/missing"}), "/$defs/missing"),
        ({"type": "regex", "regex": "a+"}, "type 'regex' is not supported"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs 'json_schema'"),
        (json_schema_format("big", {"enum": ["x" * 1000] * 40}), f"at most {MAX_SCHEMA_BYTES}"),
    ],
)
def test_a_format_that_cannot_be_served_is_a_400_naming_it(url, client, response_format, message):
    status, _, text = post(url, "/v1/completions", {"model": "base", "prompt": "Hi", "response_format": response_format})
    error = json.loads(text)["error"]
    assert status == 400 and message in error["message"] and error["message"].startswith("response_format: "), text
    assert error["param"] == "response_format" and error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "Hi"}], response_format=response_format
        )
    assert client.completions.create(model="base", prompt="Hi", max_tokens=3, temperature=0).choices[0].finish_reason


def test_without_llguidance_the_error_says_what_to_install(engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ResponseFormatError, match=r"pip install 'ftengine\[serve\]'"):
        engine.generate(["Hi"], response_format={"type": "json_object"})
    assert engine.generate(["Hi"], response_format={"type": "text"}, max_tokens=2)[0].completion_tokens == 2


def test_mask_benchmark_smoke_runs_every_format(tmp_path, capsys):
    """examples/benchmarks/bench_structured.py on the tiny tokenizer, in this process (the
    timings mean nothing): every format compiles and replays its valid documents."""
    script = Path(__file__).parent.parent / "examples" / "benchmarks" / "bench_structured.py"
    spec = importlib.util.spec_from_file_location("bench_structured", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--out", str(tmp_path / "structured.json")])
    result = json.loads((tmp_path / "structured.json").read_text())
    assert result["smoke"] and list(result["formats"]) == ["json_object", "contact record", "nested order"]
    assert all(f["mask"]["tokens"] > 50 and f["apply"]["mean_us"] > 0 for f in result["formats"].values())
    assert "(smoke run: not meaningful)" in capsys.readouterr().out
