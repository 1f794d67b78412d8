"""The held-out contacts split: deterministic, schema-correct, recoverable, and disjoint from training."""

import datetime
import json
import re

import pytest
from ftengine_contacts.heldout import KINDS, generate_heldout, write_heldout
from ftengine_contacts.task import KEYS, USER_PREFIX, compact, generate_examples

N = 200
PHONE = re.compile(r"^\+1\d{10}$")
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}$")
TITLES = ("Dr.", "Ms.", "Mr.", "Mrs.", "Prof.")


@pytest.fixture(scope="module")
def rows():
    return generate_heldout(N, seed=0, with_kind=True)


def _message(row):
    user = row["messages"][0]
    assert user["role"] == "user" and user["content"].startswith(USER_PREFIX)
    return user["content"][len(USER_PREFIX) :]


def _record(row):
    assistant = row["messages"][1]
    assert assistant["role"] == "assistant"
    return json.loads(assistant["content"])


def test_same_seed_same_rows_and_another_seed_other_rows(rows):
    assert generate_heldout(N, seed=0, with_kind=True) == rows
    assert [_message(r) for r in generate_heldout(N, seed=1)] != [_message(r) for r in rows]
    assert generate_heldout(5, seed=0) == [{"messages": r["messages"]} for r in rows[:5]]


def test_records_are_schema_correct(rows):
    for row in rows:
        record = _record(row)
        assert _message(row).isascii()
        assert tuple(record) == KEYS
        assert row["messages"][1]["content"] == compact(record)
        assert isinstance(record["name"], str) and record["name"].strip() == record["name"] != ""
        assert not record["name"].startswith(TITLES)
        assert any(record[k] is not None for k in KEYS if k != "name"), record
        age = record["age"]
        assert age is None or (type(age) is int and 18 <= age <= 100)
        assert record["city"] is None or isinstance(record["city"], str)
        if record["email"] is not None:
            email = record["email"]
            assert email == email.lower() and email.count("@") == 1
            domain = email.split("@")[1]
            assert domain in ("example.com", "example.org", "example.net") or domain.endswith(".example"), email
        assert record["phone"] is None or PHONE.match(record["phone"]), record["phone"]
        if record["date"] is not None:
            assert ISO.match(record["date"]), record["date"]
            datetime.date.fromisoformat(record["date"])


def test_every_field_is_recoverable_from_its_message(rows):
    for row in rows:
        message, record = _message(row), _record(row)
        assert record["name"] in message
        if record["city"] is not None:
            assert record["city"] in message
        if record["email"] is not None:
            assert record["email"] in message.lower()
        if record["phone"] is not None:
            digits = "".join(ch for ch in message if ch.isdigit())
            assert record["phone"][2:] in digits
        if record["age"] is not None:
            assert re.search(rf"(?<!\d){record['age']}(?!\d)", message)
        if record["date"] is not None:
            assert record["date"][:4] in message
        assert not re.search(r"\bext\b|\bx\d{2,5}\b", message, re.IGNORECASE)  # the record cannot hold an extension


PHONE_SPAN = re.compile(r"(?:\+?1[\s.-]?)?\(?\d{3}\)?[\s./-]?\d{3}[\s.-]?\d{4}")


def test_no_year_but_the_dates(rows):
    # Outside phone numbers, the only year-like number is the contact's date's year: no second date.
    for row in rows:
        message, record = _message(row), _record(row)
        years = set(re.findall(r"(?<![\d,])(?:19|20)\d\d(?!\d)", PHONE_SPAN.sub(" ", message)))
        assert years <= ({record["date"][:4]} if record["date"] else set()), message


def test_messages_are_distinct_short_and_of_many_kinds(rows):
    messages = [_message(r) for r in rows]
    assert len(set(messages)) == N
    words = [len(m.split()) for m in messages]
    assert 15 <= sum(words) / N <= 70 and max(words) <= 80
    kinds = {r["kind"] for r in rows}
    assert kinds <= set(KINDS) and len(kinds) >= 10


def test_no_heldout_message_is_a_training_message(rows):
    # Compares strings only; the training rows are never shown.
    training = {r["messages"][0]["content"] for r in generate_examples(2000, "train-0")}
    assert not training & {r["messages"][0]["content"] for r in rows}


def test_write_heldout_writes_the_rows_atomically(tmp_path):
    path = write_heldout(tmp_path / "data", n=20, seed=3)
    assert path == tmp_path / "data" / "heldout.jsonl"
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == generate_heldout(20, seed=3)
    assert sorted(p.name for p in path.parent.iterdir()) == ["heldout.jsonl"]
