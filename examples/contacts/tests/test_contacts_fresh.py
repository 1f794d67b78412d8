"""The second held-out contacts set (``ftengine_contacts.fresh``): every answer follows the
output contract and can be read off its message, a seed fixes the rows, every kind of message
appears, and the bundled ``examples/contacts/data/fresh.jsonl`` is what ``write_fresh`` writes."""

import datetime as dt
import json
import re
from pathlib import Path

import pytest
from ftengine_contacts.fresh import (
    CITIES,
    DEFAULT_SEED,
    GIVEN,
    KINDS,
    MONTHS,
    SURNAMES,
    age_in_words,
    generate_cases,
    generate_fresh,
    write_fresh,
)
from ftengine_contacts.task import KEYS, compact, score, user_message

DATA = Path(__file__).resolve().parents[1] / "data"
BUNDLED = DATA / "fresh.jsonl"
RESERVED = re.compile(r"@([a-z0-9-]+\.)*(example\.(com|org|net)|[a-z0-9-]+\.(example|test))$")
E164 = re.compile(r"^\+1[2-9]\d\d[2-9]\d\d\d{4}$")
MONTH_WORDS = "|".join([m.lower() for m in MONTHS] + [m[:3].lower() for m in MONTHS] + ["sept"])
# A date a reader could take as the contact's: numeric (US or ISO order, 4-digit year), or a month
# word next to a day number.
DATE_LIKE = re.compile(
    rf"(?<![\d.])\d{{1,2}}[/.-]\d{{1,2}}[/.-]\d{{4}}(?!\d)"
    rf"|(?<!\d)\d{{4}}[/-]\d{{2}}[/-]\d{{2}}(?!\d)"
    rf"|\b(?:{MONTH_WORDS})\b\.?,? \d"
    rf"|\d(?:st|nd|rd|th)? (?:of )?(?:{MONTH_WORDS})\b"
    rf"|\d-(?:{MONTH_WORDS})-\d",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def cases():
    return generate_cases(100, DEFAULT_SEED)


def phone_spans(message):
    """The digits of every run of phone-like characters in ``message``."""
    return [re.sub(r"\D", "", m) for m in re.findall(r"[+(]?\d[\d ().+-]{8,}\d", message)]


def test_rows_follow_the_output_contract(cases):
    rows = generate_fresh(100, DEFAULT_SEED)
    assert len(rows) == 100
    for row, (_, message, record) in zip(rows, cases):
        user, assistant = row["messages"]
        assert user == user_message(message)
        assert assistant["role"] == "assistant"
        assert assistant["content"] == compact(record)
        parsed = json.loads(assistant["content"])
        assert list(parsed) == list(KEYS)
        assert "\n" not in assistant["content"]
        if parsed["age"] is not None:
            assert isinstance(parsed["age"], int) and not isinstance(parsed["age"], bool)
        if parsed["email"] is not None:
            assert parsed["email"] == parsed["email"].lower() and RESERVED.search(parsed["email"]), parsed["email"]
        if parsed["phone"] is not None:
            assert E164.match(parsed["phone"]), parsed["phone"]
        if parsed["date"] is not None:
            assert dt.date.fromisoformat(parsed["date"]).isoformat() == parsed["date"]
        if parsed["name"] is not None:
            assert not re.match(r"(Dr|Prof|Ms|Mrs|Mr|Mx)\.? ", parsed["name"]), parsed["name"]
            assert parsed["name"].isascii()


def test_every_value_can_be_read_off_its_message(cases):
    for kind, message, record in cases:
        where = f"{kind}: {message!r}"
        if record["name"] is not None:
            assert record["name"] in message, where
        if record["city"] is not None:
            assert record["city"] in message, where
        if record["email"] is not None:
            assert record["email"] in message.lower(), where
        if record["phone"] is not None:
            digits = record["phone"][2:]
            assert any(digits in span for span in phone_spans(message)), where
        if record["age"] is not None:
            age = record["age"]
            assert re.search(rf"(?<![\d$.]){age}(?!\d|\.\d)|\b{age_in_words(age)}\b", message, re.IGNORECASE), where
        if record["date"] is not None:
            date = dt.date.fromisoformat(record["date"])
            text = message.lower()
            assert str(date.year) in text, where
            month = MONTHS[date.month - 1].lower()
            assert month[:3] in text or re.search(rf"(?<!\d)0?{date.month}(?!\d)", text), where
            assert re.search(rf"(?<!\d)0?{date.day}(?!\d)", text), where


def test_a_message_holds_no_second_date_or_city(cases):
    """The answer is unambiguous: one date at most (exactly one when the record has one), and no
    city other than the contact's."""
    for kind, message, record in cases:
        dates = DATE_LIKE.findall(message)
        assert len(dates) == (record["date"] is not None), f"{kind}: {dates} in {message!r}"
        cities = {c for c in CITIES if re.search(rf"(?<![\w-]){re.escape(c)}(?![\w-])", message)}
        assert cities == ({record["city"]} if record["city"] else set()), f"{kind}: {cities} in {message!r}"


def test_a_nameless_contacts_email_gives_no_name_away(cases):
    """With ``name`` null, the address is a made-up handle: a reader could not take a name from it."""
    names = {re.sub(r"[^a-z]", "", n.lower()) for n in GIVEN + SURNAMES} - {""}
    nameless = [record["email"] for _, _, record in cases if record["name"] is None and record["email"]]
    assert nameless
    for email in nameless:
        local = email.split("@")[0]
        assert not [n for n in names if len(n) >= 4 and n in local], email


def test_rows_are_fixed_by_the_seed():
    assert generate_fresh(24, seed=3) == generate_fresh(24, seed=3)
    assert generate_fresh(24, seed=3) != generate_fresh(24, seed=4)
    # A longer set starts with the shorter one.
    assert generate_fresh(40, seed=3)[:24] == generate_fresh(24, seed=3)


def test_every_kind_appears_and_messages_are_unique(cases):
    assert len(KINDS) >= 12
    assert {kind for kind, _, _ in generate_cases(len(KINDS), seed=11)} == set(KINDS)
    assert {kind for kind, _, _ in cases} == set(KINDS)
    assert len({message for _, message, _ in cases}) == len(cases)


def test_fields_are_present_about_sixty_percent_of_the_time(cases):
    values = [record[key] for _, _, record in cases for key in KEYS]
    assert 0.5 <= sum(v is not None for v in values) / len(values) <= 0.7
    for key in KEYS:  # every field is sometimes there and sometimes null
        assert 0 < sum(record[key] is None for _, _, record in cases) < len(cases), key


def test_bundled_file_is_what_write_fresh_writes(tmp_path):
    path = write_fresh(tmp_path)
    assert path == tmp_path / "fresh.jsonl"
    assert BUNDLED.read_text() == path.read_text()
    rows = [json.loads(line) for line in BUNDLED.read_text().splitlines()]
    assert len(rows) == 100 and rows == generate_fresh(100, DEFAULT_SEED)


def test_the_contacts_scorer_gives_the_reference_answers_full_marks():
    rows = [json.loads(line) for line in BUNDLED.read_text().splitlines()]
    answers = [row["messages"][-1]["content"] for row in rows]
    assert set(score(answers, [json.loads(a) for a in answers]).values()) == {1.0}


def test_no_fresh_message_appears_in_the_other_contacts_files():
    """Disjoint from the training, validation and first held-out rows (compared, never printed)."""
    fresh = {row["messages"][0]["content"] for row in generate_fresh(100, DEFAULT_SEED)}
    others = set()
    for name in ("train.jsonl", "valid.jsonl", "heldout.jsonl"):
        for line in (DATA / name).read_text().splitlines():
            others.add(json.loads(line)["messages"][0]["content"])
    overlap = len(fresh & others)
    assert overlap == 0, f"{overlap} fresh messages also appear in the other files"
