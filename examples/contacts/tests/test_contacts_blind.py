"""The blind held-out set: deterministic, recoverable under the contract, bundled file up to date."""

import calendar
import datetime
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from ftengine_contacts import blind
from ftengine_contacts.task import KEYS, compact, user_message

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "blind.jsonl"
PREFIX = user_message("")["content"]
RESERVED = re.compile(r"@(?:[a-z0-9-]+\.)*(?:example\.(?:com|org|net)|[a-z0-9-]+\.(?:example|test))$")
ADDRESS = re.compile(r"[A-Za-z0-9._+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
DATE_WORDS = r"\b(?:" + "|".join((*calendar.month_name[1:], *calendar.day_name)) + r")\b"
TITLE = re.compile(r"^(?:Dr|Prof|Ms|Mrs|Mr|Mx)\.?\s")


@pytest.fixture(scope="module")
def drawn():
    return blind.draw_blind(400, seed=7) + blind.draw_blind(blind.ROWS)


def test_same_seed_same_rows_other_seed_other_rows():
    assert blind.generate_blind(40, seed=3) == blind.generate_blind(40, seed=3)
    assert blind.generate_blind(40, seed=3) != blind.generate_blind(40, seed=4)


def test_rows_are_chat_rows_with_the_compact_record():
    rows = blind.generate_blind(50, seed=1)
    for row, b in zip(rows, blind.draw_blind(50, seed=1)):
        user, assistant = row["messages"]
        assert user == user_message(b.text)
        assert user["content"].startswith(PREFIX)
        assert assistant == {"role": "assistant", "content": compact(b.record)}
        assert list(json.loads(assistant["content"])) == list(KEYS)
    assert len({row["messages"][0]["content"] for row in rows}) == len(rows)


def test_bundled_file_is_the_generator_output(tmp_path):
    expected = blind.generate_blind(blind.ROWS, blind.SEED)
    assert [json.loads(line) for line in BUNDLED.read_text().splitlines()] == expected
    path = blind.write_blind(tmp_path)
    assert path == tmp_path / "blind.jsonl"
    assert path.read_text() == BUNDLED.read_text()


def test_every_kind_in_a_hundred_rows():
    assert len(blind.KINDS) >= 16
    for seed in (blind.SEED, 0, 1, 2):
        assert {b.kind for b in blind.draw_blind(100, seed)} == set(blind.KINDS)


def test_each_field_present_at_its_own_rate():
    records = [b.record for b in blind.draw_blind(1000, seed=11)]
    rate = {key: sum(r[key] is not None for r in records) / len(records) for key in KEYS}
    assert 0.85 <= rate["name"] <= 0.95
    for key in KEYS[1:]:
        assert 0.45 <= rate[key] <= 0.75, (key, rate[key])
    assert all(sum(v is not None for v in r.values()) >= 2 for r in records)


def _digits(text):
    return re.sub(r"\D", "", text)


def _date_written(text, iso):
    when = datetime.date.fromisoformat(iso)
    months = {calendar.month_name[when.month], calendar.month_abbr[when.month]} | ({"Sept"} if when.month == 9 else set())
    words = re.compile(r"\b(?:" + "|".join(sorted(months)) + r")\b", re.IGNORECASE)
    day = rf"0?{when.day}(?:st|nd|rd|th)?"
    numeric = [
        rf"\b0?{when.month}(?P<sep>[/-]){day}(?P=sep){when.year}\b",
        rf"\b{when.year}(?P<sep>[/-]){when.month:02d}(?P=sep){when.day:02d}\b",
    ]
    if any(re.search(pattern, text) for pattern in numeric):
        return True
    return bool(words.search(text)) and re.search(rf"\b{day}\b", text) is not None and str(when.year) in text


def test_every_value_is_recoverable_from_its_message(drawn):
    for b in drawn:
        text, record = b.text, b.record
        assert list(record) == list(KEYS)
        if record["name"] is not None:
            assert record["name"] in text and not TITLE.match(record["name"]), (b.kind, text)
        if record["age"] is not None:
            assert isinstance(record["age"], int) and 18 <= record["age"] <= 89
            assert re.search(rf"(?<![\d.$#]){record['age']}(?![\d])", text), (b.kind, text)
        if record["city"] is not None:
            assert record["city"] in blind.CITIES and record["city"] in text
        if record["email"] is not None:
            assert record["email"] == record["email"].lower() and RESERVED.search(record["email"])
            assert record["email"] in text.lower(), (b.kind, text)
        if record["phone"] is not None:
            assert re.fullmatch(r"\+1[2-9]\d\d[2-9]\d{6}", record["phone"])
            assert record["phone"][3:5] != "11" and record["phone"][6:8] != "11"
            assert record["phone"][2:] in _digits(text), (b.kind, text)
        if record["date"] is not None:
            assert _date_written(text, record["date"]), (b.kind, text, record["date"])


def test_nothing_else_could_be_taken_for_the_contacts_details(drawn):
    for b in drawn:
        text, record = b.text, b.record
        cities = [city for city in blind.CITIES if re.search(rf"(?<![\w']){re.escape(city)}(?![\w'-])", text)]
        assert cities == ([record["city"]] if record["city"] else []), (b.kind, text)
        if record["date"] is None:  # the one date of a message is the record's
            assert not re.search(DATE_WORDS, text) and not re.search(
                r"\b\d{1,2}[/-]\d{1,2}[/-]\d{4}\b|\b\d{4}[/-]\d\d[/-]\d\d\b", text
            ), (b.kind, text)
        addresses = {address.lower() for address in ADDRESS.findall(text)}
        theirs = {other.email_lower for other in b.others if other.email_lower}
        assert addresses - {record["email"]} <= theirs, (b.kind, text)
        assert all(RESERVED.search(address) for address in addresses)
        for other in b.others:
            assert other.phone_e164 is None or other.phone_e164 != record["phone"]
            assert other.email_lower is None or other.email_lower != record["email"]
            if record["name"] is not None:
                assert not other.tokens & set(re.split(r"[ -]", record["name"])), (b.kind, text)


def test_pools_are_wide_and_do_not_collide():
    given = [name for names in blind.GIVEN.values() for name in names]
    assert len(given) >= 150 and len(set(given)) == len(given)
    assert len(blind.SURNAMES) >= 100 and len(set(blind.SURNAMES)) == len(blind.SURNAMES)
    assert len(blind.CITIES) >= 100 and len(set(blind.CITIES)) == len(blind.CITIES)
    assert sum(" " in city or "-" in city for city in blind.CITIES) >= 30
    city_words = {word.lower() for city in blind.CITIES for word in re.split(r"[ -]", city)}
    month_words = {w.lower() for w in (*calendar.month_name[1:], *calendar.month_abbr[1:], *calendar.day_name)}
    name_words = {word.lower() for name in (*given, *blind.SURNAMES) for word in re.split(r"[ -]", name)}
    assert not {word for word in name_words & (city_words | month_words) if len(word) > 3}  # not "de", "la", "St."


def test_kinds_spread_over_the_bundled_rows():
    counts = Counter(b.kind for b in blind.draw_blind(blind.ROWS))
    assert min(counts.values()) >= blind.ROWS // len(blind.KINDS) - 1
