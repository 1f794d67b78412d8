"""The bundled "contacts" task: generator, scoring, preference pairs and the eval plugin."""

import calendar
import datetime
import json
import re
from pathlib import Path
from types import SimpleNamespace

import ftengine_contacts as contacts
import pytest
import torch
from ftengine.modeling import eval_mode
from ftengine.state import Datasets
from ftengine.testing import greedy_without_cache, tiny_model, tiny_tokenizer
from ftengine_contacts import task
from ftengine_contacts.heldout import write_heldout

E164 = re.compile(r"\+1\d{10}")
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
EMAIL = re.compile(r"[a-z0-9._+-]+@[a-z0-9.-]+\.[a-z]+")
MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_name) if name}
MONTHS.update({abbr.lower(): i for i, abbr in enumerate(calendar.month_abbr) if abbr})
MONTHS["sept"] = 9
MONTH = "|".join(sorted(MONTHS, key=len, reverse=True))
WEEKDAY = "|".join(sorted({*calendar.day_name, *calendar.day_abbr}, key=len, reverse=True))
# How a North American number may be spelled: an optional +1 or 1, then 3, 3 and 4 digits with
# at most one separator between groups.
PHONE = re.compile(r"(?<![\d.])(?:\+?1[ .-]?)?\(?(\d{3})\)?[ ./-]?(\d{3})[ .-]?(\d{4})(?!\d)")


@pytest.fixture(scope="module")
def examples():
    return task.generate_examples(600, seed=0)


@pytest.fixture(scope="module")
def many_examples():
    return task.generate_examples(2000, seed=11)


def dates_in(message):
    """ISO dates of every date spelling the task promises to use, parsed independently."""
    found = {m.group(0) for m in re.finditer(r"\b\d{4}-\d{2}-\d{2}\b", message)}
    for m, _, d, y in re.findall(r"\b(\d{1,2})([/.-])(\d{1,2})\2(\d{4})\b", message):
        found.add(f"{y}-{int(m):02d}-{int(d):02d}")
    for y, m, d in re.findall(r"\b(\d{4})/(\d{2})/(\d{2})\b", message):
        found.add(f"{y}-{m}-{d}")
    flags = re.IGNORECASE
    for month, d, y in re.findall(rf"\b({MONTH})\.? (\d{{1,2}})(?:st|nd|rd|th)?,? (\d{{4}})", message, flags):
        found.add(f"{y}-{MONTHS[month.lower()]:02d}-{int(d):02d}")
    for d, month, y in re.findall(rf"\b(\d{{1,2}})(?:st|nd|rd|th)?[ -](?:of )?({MONTH})\.?,?[ -](\d{{4}})", message, flags):
        found.add(f"{y}-{MONTHS[month.lower()]:02d}-{int(d):02d}")
    return found


# One to nineteen, and the tens, as words.
NUMBER_WORDS = re.findall(
    r"[a-z]+",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen",
)
TENS_WORDS = re.findall(r"[a-z]+", "twenty thirty forty fifty sixty seventy eighty ninety")


def ages_in_words(message):
    """Numbers from 10 to 99 spelled in words (``thirty-five``, ``Forty two``, ``eighteen``), parsed
    independently."""
    found = set()
    units = "|".join(NUMBER_WORDS[:9])
    for tens, unit in re.findall(rf"\b({'|'.join(TENS_WORDS)})(?:[- ]({units}))?\b", message, re.IGNORECASE):
        found.add(10 * (TENS_WORDS.index(tens.lower()) + 2) + (NUMBER_WORDS.index(unit.lower()) + 1 if unit else 0))
    for teen in re.findall(rf"\b({'|'.join(NUMBER_WORDS[9:])})\b", message, re.IGNORECASE):
        found.add(NUMBER_WORDS.index(teen.lower()) + 1)
    return found


def phones_in(message):
    """E.164 forms of every phone-number spelling in ``message``, parsed independently."""
    return {f"+1{a}{x}{n}" for a, x, n in PHONE.findall(message)}


def name_words(name):
    return {word.lower() for word in re.split(r"[\s\-']+", name) if len(word) > 1}


# --------------------------------------------------------------------------------------------
# generator
# --------------------------------------------------------------------------------------------


def test_generator_is_deterministic_per_seed():
    assert task.generate_examples(40, seed=3) == task.generate_examples(40, seed=3)
    other = task.generate_examples(40, seed=4)
    assert {e["message"] for e in other}.isdisjoint(e["message"] for e in task.generate_examples(40, seed=3))


def test_write_splits_files_are_disjoint_and_well_formed(tmp_path):
    paths = task.write_splits(tmp_path, n_train=120, n_valid=30, n_prefs=40, n_prefs_valid=10, seed=0)
    assert set(paths) == {"train", "valid", "prefs_train", "prefs_valid"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{s}.jsonl" for s in paths)
    rows = {split: [json.loads(line) for line in path.read_text().splitlines()] for split, path in paths.items()}
    assert [len(rows[s]) for s in ("train", "valid", "prefs_train", "prefs_valid")] == [120, 30, 40, 10]
    for split in ("train", "valid"):
        for row in rows[split]:
            assert list(row) == ["messages"]
            user, assistant = row["messages"]
            assert user["role"] == "user" and user["content"].startswith(task.USER_PREFIX)
            assert assistant == {"role": "assistant", "content": task.compact(json.loads(assistant["content"]))}
    for split in ("prefs_train", "prefs_valid"):
        for row in rows[split]:
            assert list(row) == ["prompt", "chosen", "rejected"]
    messages = {
        split: {(r["messages"][0] if "messages" in r else r["prompt"][0])["content"] for r in split_rows}
        for split, split_rows in rows.items()
    }
    assert sum(map(len, messages.values())) == len(set().union(*messages.values())) == 200
    # The same seed writes the same files.
    again = task.write_splits(tmp_path / "again", n_train=120, n_valid=30, n_prefs=40, n_prefs_valid=10, seed=0)
    assert all(again[s].read_text() == paths[s].read_text() for s in paths)


def test_committed_example_data_is_what_the_generator_writes(tmp_path):
    """examples/contacts/data was regenerated after the last change to the generator."""
    committed = Path(__file__).parent.parent / "data"
    paths = task.write_splits(tmp_path, seed=0) | {"heldout": write_heldout(tmp_path, n=100, seed=0)}
    for split, path in paths.items():
        assert (committed / path.name).read_text() == path.read_text(), f"regenerate {split}: see examples/contacts/README.md"


def test_records_follow_the_conventions(examples):
    for example in examples:
        record = example["record"]
        assert tuple(record) == task.KEYS
        assert example["messages"][1]["content"] == json.dumps(record, separators=(",", ":"))
        name, age, city, email, phone, date = record.values()
        assert name is None or (name.strip() == name and name.split()[0] not in task.TITLES)
        assert age is None or type(age) is int
        assert city is None or city in task.CITIES
        assert email is None or EMAIL.fullmatch(email)
        assert phone is None or E164.fullmatch(phone)
        assert date is None or ISO_DATE.fullmatch(date)


def test_every_field_is_recoverable_from_its_message(many_examples):
    """A self-check of the generator: each non-null field can be read off the message, and a
    null one is not there to read."""
    for example in many_examples:
        message, record = example["message"], example["record"]
        assert example["messages"][0]["content"] == task.USER_PREFIX + message
        if record["name"]:
            assert record["name"] in message  # as written, less any title
            before = message[: message.index(record["name"])].split()
            assert not before or before[-1] not in task.TITLES or before[-1].rstrip(".") + "." in task.TITLES
        if record["age"] is not None:
            assert re.search(rf"(?<!\d){record['age']}(?!\d)", message) or record["age"] in ages_in_words(message)
        if record["city"]:
            assert record["city"] in message
        else:
            assert not any(re.search(rf"\b{re.escape(city)}\b", message) for city in task.CITIES)
        if record["email"]:
            assert record["email"] in message.lower()
        # No address but the contact's and other people's (framed as theirs).
        assert set(EMAIL.findall(message.lower())) == {record["email"], *example["others"]["emails"]} - {None}
        digits = re.sub(r"\D", "", message)
        if record["phone"]:
            # The 10 digits in order among the message's digits (a leading 1 may precede them).
            assert record["phone"][2:] in digits
        assert phones_in(message) == {record["phone"], *example["others"]["phones"]} - {None}
        if record["date"]:
            assert record["date"][:4] in message
            assert dates_in(message) == {record["date"]}
            weekdays = re.findall(rf"\b({WEEKDAY})\b", message)
            weekday = datetime.date.fromisoformat(record["date"]).weekday()
            assert all(w in (calendar.day_name[weekday], calendar.day_abbr[weekday]) for w in weekdays)
        else:
            assert dates_in(message) == set()


def test_other_peoples_details_are_never_the_contacts(many_examples):
    shown = {"names": 0, "phones": 0, "emails": 0}
    for example in many_examples:
        message, record, others = example["message"], example["record"], example["others"]
        for name in others["names"]:
            assert name in message
            assert record["name"] is None or name_words(name).isdisjoint(name_words(record["name"]))
        for phone in others["phones"]:
            assert E164.fullmatch(phone) and phone != record["phone"]
        for email in others["emails"]:
            assert EMAIL.fullmatch(email) and email in message.lower() and email != record["email"]
        for key in shown:
            shown[key] += bool(others[key])
    # Often enough to matter (in scenes most messages name someone else), rarely enough not to
    # crowd out the contact.
    assert 0.3 < shown["names"] / len(many_examples) < 0.7, shown
    assert all(0.08 < shown[key] / len(many_examples) < 0.4 for key in ("phones", "emails")), shown


def full_names(others):
    return [name for name in others.get("names", []) if " " in name]


def test_scenes_put_the_contact_among_other_people_in_roles(many_examples):
    """Staff, authors, forwarders and attendees with full names and their own phones and
    e-mails; the record is the subject's alone, and a detail only someone else gave stays null."""
    named = [e for e in many_examples if e["record"]["name"]]
    among_others = [e for e in named if full_names(e["others"])]
    assert len(among_others) > 0.3 * len(named)
    assert sum(len(full_names(e["others"])) >= 2 for e in named) > 0.08 * len(named)
    # The first full name in the message is often not the contact's.
    first_is_other = [
        e
        for e in among_others
        if min(e["message"].index(n) for n in full_names(e["others"])) < e["message"].index(e["record"]["name"])
    ]
    assert len(first_is_other) > 0.15 * len(named)
    # Someone else's number or address is the only one in the message: the record's is null.
    only_theirs = {
        key: sum(e["record"][key] is None and bool(e["others"].get(key + "s")) for e in many_examples)
        for key in ("phone", "email")
    }
    assert all(count > 0.04 * len(many_examples) for count in only_theirs.values()), only_theirs
    # Roles name the subject and the staff.
    text = "\n".join(e["message"] for e in many_examples)
    for role in ("guest", "patient", "candidate", "tenant", "recipient", "new member", "customer"):
        assert re.search(rf"\b{role} [A-Z]", text, re.IGNORECASE), role
    for role in ("sales rep", "desk clerk", "driver", "building super", "organiser", "recruiter", "secretary", "coach"):
        assert role in text, role


def test_ages_come_in_apposition_too(many_examples):
    """``Kang Ji-woo, 41, quiet ...``, ``Torbjorn (46) is ...``, ``X is 63, which ...``, ``a 39 y/o``."""
    forms = {"name, age,": 0, "first (age)": 0, "is age, which": 0, "a age y/o": 0}
    for example in many_examples:
        message, record = example["message"], example["record"]
        if record["age"] is None or record["name"] is None:
            continue
        age, first = record["age"], record["name"].split()[0]
        forms["name, age,"] += bool(re.search(rf"{re.escape(record['name'])}, {age}, [a-z]+ ", message))
        forms["first (age)"] += bool(re.search(rf"\b{re.escape(first)} \({age}\) [a-z]", message)) and first != record["name"]
        forms["is age, which"] += bool(re.search(rf"\bis {age}, which\b", message))
        forms["a age y/o"] += bool(re.search(rf"\b[Aa]n? {age} y/o\b", message))
    assert all(count >= 10 for count in forms.values()), forms


def test_dates_often_have_single_digit_days(many_examples):
    """``Aug. 1, 2024``, ``4/2/2024`` and ``4.2.2024`` must come out zero-padded: they need to be common."""
    dates = [datetime.date.fromisoformat(e["record"]["date"]) for e in many_examples if e["record"]["date"]]
    assert sum(d.day < 10 for d in dates) > 0.4 * len(dates)
    unpadded = sum(
        bool(re.search(rf"(?<![\d/.]){d.month}(?P<sep>[/.]){d.day}(?P=sep){d.year}\b", e["message"]))
        for e, d in zip((e for e in many_examples if e["record"]["date"]), dates)
        if d.day < 10 and d.month < 10
    )
    assert unpadded > 0.03 * len(dates)


# Each document shape, recognised by what only it writes.
DOCUMENT_MARKERS = {
    # A header line: three or more cells of column names and nothing else, then a row.
    "spreadsheet row under its header": (
        r"(?im)^\|? ?(?:(?:full.?name|name|contact|client|customer name|e-?mail|email.address|mail|mobile|mobile #|phone"
        r"|phone.number|tel|cell|contact no|city|town|location|home city|city/town|age|age \(yrs\)|yrs|age_years|date|appt"
        r"|start date|follow_up|visit date|move-in|booked for|id|status|source|amount|qty|notes|owner|ref) ?(?:,|\t|\||;|$) ?)"
        r"{3,}\|?\n"
    ),
    "business card": r"Handwritten on back|\[handwritten\]|Note \(back of card\)|\[Scanned business card\]|Business card \(scan\)",
    "invoice or receipt": r"(?m)^(?:BILL TO|Bill to|Sold to|Billed to|Customer): .*\n(?:.*\n)*TOTAL \$",
    "waybill": r"(?m)^(?:WAYBILL|Delivery note|Consignment note|Bill of lading) [A-Z]+-\d{5}-",
    "chat thread": r"(?m)(?:^(?:\[|\()?\d{1,2}:\d{2}(?:\]|\))?(?: [AaPp][Mm])? [^:\n]+: .*\n){3}",
    "classified ad": r"OBO\.|Roommate wanted\.|must pick up\.|Tutor available|Lost cat|WANTED: used|Garage sale!",
    "intake note": r"Entered by .+, ext\. \d+|\(front desk\) x\d+|Taken by .+, ext \d+",
    "screening bullets": r"(?m)^Phone screen - .+\n[-*•>] ",
    "RSVP": r"(?m)^(?:RSVP: |RSVP - |Reply for the )(?:Spring gala|Alumni dinner|Team offsite|Book launch|Charity 5K|Open house)",
    "forwarded e-mail headers": r"(?m)^From: .+\nSubject: .+\nTo: ",
    "long signature": r"(?m)^(?:www\.|https://)?[a-z]+\.example$",
    "social post": r"(?m)^.+ · \d+[hm]$|\(@[a-z]+\w*\)$|^Posted by ",
    "handwritten note": r"\(handwritten note, scanned\)|\[photo of sticky note\]|^NEW CLIENT -> ",
    "message to a named reader": r"^(?:Hi|Dear|Hey|Hello) [A-Z][^,!\n]*[,!]\n",
}


def test_document_shapes_each_appear_at_a_modest_rate(many_examples):
    """Spreadsheet rows, business cards, invoices, waybills, chat threads, ads, intake notes ...:
    each common enough to learn from, none crowding out the others."""
    messages = [e["message"] for e in many_examples]
    rates = {
        kind: sum(bool(re.search(pattern, m)) for m in messages) / len(messages) for kind, pattern in DOCUMENT_MARKERS.items()
    }
    assert all(0.005 < rate < 0.08 for rate in rates.values()), rates
    # Spreadsheet rows: several delimiters, header spellings and column orders.
    rows = [m for m in messages if re.search(DOCUMENT_MARKERS["spreadsheet row under its header"], m)]
    for delimiter in (",", "\t", "|", ";"):
        assert any(delimiter in m.split("\n")[-1] for m in rows), delimiter
    headers = {line.lower() for m in rows for line in m.split("\n") if re.search(r"(?i)e-?mail", line)}
    assert len(headers) > 0.6 * len(rows)


def test_nameless_messages_name_other_people_and_keep_the_other_fields(many_examples):
    """With no contact name, a greeting's addressee, staff, a vendor or an e-mail handle that reads
    like words must not become the name; the contact's other details are still there to copy."""
    nameless = [e for e in many_examples if e["record"]["name"] is None]
    assert 0.04 < len(nameless) / len(many_examples) < 0.1
    assert sum(bool(e["others"]["names"]) for e in nameless) > 0.25 * len(nameless)
    assert sum(bool(re.match(r"(?:Hi|Dear|Hey|Hello) [A-Z]", e["message"])) for e in nameless) >= 5
    assert sum(sum(v is not None for v in e["record"].values()) for e in nameless) / len(nameless) > 2.5
    emails = [e["record"]["email"].split("@")[0] for e in nameless if e["record"]["email"]]
    worded = [local for local in emails if any(word in local for word in task.HANDLE_WORDS)]
    assert len(worded) > 0.3 * len(emails)


def test_spellings_of_ages_phones_dates_and_emails_vary(many_examples):
    messages = [e["message"] for e in many_examples]
    records = [e["record"] for e in many_examples]
    aged = [(m, r["age"]) for m, r in zip(messages, records) if r["age"] is not None]
    in_words = sum(not re.search(rf"(?<!\d){age}(?!\d)", m) and age in ages_in_words(m) for m, age in aged)
    assert 0.03 < in_words / len(aged) < 0.15
    text = "\n".join(messages)
    for pattern in (
        r"\b(?:thirty|forty|fifty|sixty)[- ](?:one|two|three|four|five|six|seven|eight|nine)\b",
        r"\d{4}(?:,? ext\.? | x)\d+",  # an extension after the number
        r"\b\d{2}-(?:JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|OCT|NOV|DEC)-\d{4}\b",
        r"\b\d{1,2}\.\d{1,2}\.\d{4}\b",  # 10.27.2024, US order
        r"\b\d{4}/\d{2}/\d{2}\b",
        r"@[a-z]+\.[a-z-]+\.example\b",  # a subdomain
        r"\b\d{3}-\d{7}\b",  # 366-9713787
    ):
        assert re.search(pattern, text), pattern
    # An extension is never part of the record's phone.
    extended = [(m, r) for m, r in zip(messages, records) if r["phone"] and re.search(r"\d{4}(?:,? ext\.? | x)\d+", m)]
    assert len(extended) > 0.02 * sum(bool(r["phone"]) for r in records)
    assert all(E164.fullmatch(r["phone"]) for _, r in extended)


def test_names_and_addresses_are_long_enough_to_test_copying(many_examples):
    """Two surnames (``Camila Lindqvist Abdullah``), suffixes and long local parts: more letters
    to copy exactly."""
    names = [e["record"]["name"] for e in many_examples if e["record"]["name"]]
    surnames = [
        [w for w in name.split()[1:] if w[0].isupper() and not w.endswith(".") and w not in task.SUFFIXES] for name in names
    ]
    assert sum(len(words) >= 2 for words in surnames) > 0.075 * len(names)
    assert any(name.endswith((" Jr.", " III", " II", " Sr.")) for name in names)
    emails = [e["record"]["email"] for e in many_examples if e["record"]["email"]]
    assert sum(len(email.split("@")[0]) >= 20 for email in emails) > 0.08 * len(emails)


def test_company_names_and_streets_name_no_city():
    """A vendor's or a card's street naming a city would make the contact's city ambiguous."""
    for pool in (task.COMPANY_WORDS, task.COMPANY_KINDS, task.STREETS):
        assert len(pool) >= 15
        for entry in pool:
            assert not any(re.search(rf"\b{re.escape(city)}\b", entry) for city in task.CITIES), entry


def test_hard_to_copy_values_are_common(many_examples):
    """Long multi-word cities, made-up handles and addresses typed in upper or mixed case."""
    long_cities = [city for city in task.CITIES if len(re.split(r"[\s-]+", city)) >= 3 or len(city) >= 12]
    assert len(long_cities) >= 60 and len(task.CITIES) >= 400
    messages = [e["message"] for e in many_examples]
    records = [e["record"] for e in many_examples]
    emails = [(m, r["email"]) for m, r in zip(messages, records) if r["email"]]
    typed_with_capitals = sum(email not in m for m, email in emails)
    assert typed_with_capitals > 0.33 * len(emails)
    assert sum(email.upper() in m for m, email in emails) > 0.08 * len(emails)
    # Handles that share nothing with the name: trellrunner26, quietfox.
    words = task.HANDLE_WORDS
    assert sum(any(w in email.split("@")[0] for w in words) for _, email in emails) > 0.1 * len(emails)


def test_name_pools_are_large_varied_and_clear_of_other_fields():
    pools = (task.FEMALE_FIRST_NAMES, task.MALE_FIRST_NAMES, task.LAST_NAMES, task.CITIES)
    assert all(len(set(pool)) == len(pool) for pool in pools)
    assert min(map(len, pools[:3])) >= 200 and len(task.CITIES) >= 200
    names = {*task.FEMALE_FIRST_NAMES, *task.MALE_FIRST_NAMES, *task.LAST_NAMES}
    assert any("-" in n for n in names) and any("'" in n for n in names) and any(" " in n for n in task.LAST_NAMES)
    assert all(name.isascii() for name in names)  # the target JSON would escape anything else
    # A city, a month or a weekday in a name would make a message ambiguous.
    reserved = {*map(str.lower, task.CITIES), *MONTHS, *(d.lower() for d in (*calendar.day_name, *calendar.day_abbr))}
    assert not {word.lower() for name in names for word in re.split(r"[\s\-]+", name)} & reserved


def test_inputs_vary_in_the_ways_the_task_promises(many_examples):
    messages = [e["message"] for e in many_examples]
    records = [e["record"] for e in many_examples]
    text = "\n".join(messages)
    for pattern in (
        r"\(\d{3}\) \d{3}-\d{4}",  # phones
        r"\b\d{3}\.\d{3}\.\d{4}\b",
        r"(?<![\d+])\d{10}\b",
        r"\+1 \d{3} \d{3} \d{4}",
        r"\b\d{2}/\d{2}/\d{4}\b",  # dates
        r"\b\d{1,2}-\d{1,2}-\d{4}\b",
        rf"\b({WEEKDAY})\.?,? ",
        r"\b(Jan|Feb|Mar|Apr|Aug|Sept?|Oct|Nov|Dec)\. \d",
        r"the \d+(st|nd|rd|th) of",
        r"\b(Dr|Ms|Mr|Mrs|Prof|Mx)\.? [A-Z]",  # titles, with and without the period
        r"\+[a-z]+@",  # plus-addressing
        r"@[a-z-]+\.example\b",  # names under the .example TLD
        r"\b[A-Z]\. [A-Z]",  # middle initials
        r"#\d{5,6}|\$\d",  # order numbers, prices
    ):
        assert re.search(pattern, text), pattern
    phones = [r["phone"] for r in records if r["phone"]]
    assert len({p[2:5] for p in phones}) > 300 and sum(p[5:8] == "555" for p in phones) < 0.05 * len(phones)
    names = [r["name"] for r in records if r["name"]]
    pooled = {*task.FEMALE_FIRST_NAMES, *task.MALE_FIRST_NAMES}
    made_up = sum(not any(name.startswith(first) for first in pooled) for name in names)
    assert 0.15 < made_up / len(names) < 0.4  # first names built from syllables
    assert len(set(names)) > 0.95 * len(names)
    assert any(r["email"] and r["email"] not in m for m, r in zip(messages, records))  # typed with capitals
    for key in task.KEYS:
        nulls = sum(r[key] is None for r in records) / len(records)
        assert nulls < 0.1 if key == "name" else 0.15 < nulls < 0.7
    assert 15 <= sum(len(m.split()) for m in messages) / len(messages) <= 25


# --------------------------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------------------------

REFERENCE = {
    "name": "Jane Doe",
    "age": 34,
    "city": "Boston",
    "email": "jane.doe@example.com",
    "phone": "+16175550142",
    "date": "2025-03-03",
}
PERFECT = task.compact(REFERENCE)


def test_score_perfect_output():
    assert task.score([PERFECT, f"  {PERFECT} "], [REFERENCE, REFERENCE]) == {
        "schema_valid": 1.0,
        "exact_match": 1.0,
        **{f"field_{k}": 1.0 for k in task.KEYS},
    }


def test_a_newline_makes_the_answer_invalid():
    """Generation stops at the first newline, so a newline is all that is left of whatever
    followed the JSON: the answer is not exactly one line."""
    result = task.score([f"{PERFECT}\n"], [REFERENCE])
    assert result["schema_valid"] == 0.0 and result["exact_match"] == 0.0 and result["field_name"] == 1.0


def test_score_wrong_key_order_is_schema_invalid_but_fields_count():
    reordered = task.compact({k: REFERENCE[k] for k in reversed(task.KEYS)})
    result = task.score([reordered], [REFERENCE])
    assert result["schema_valid"] == result["exact_match"] == 0.0
    assert all(result[f"field_{k}"] == 1.0 for k in task.KEYS)


@pytest.mark.parametrize(
    "output",
    [
        f"Here is the contact record: {PERFECT}",
        f"```json\n{PERFECT}\n```",
        PERFECT[:-1] + ',"name":"Jane Doe"}',  # a duplicate key
    ],
)
def test_score_unparseable_output_is_wrong_everywhere(output):
    assert set(task.score([output], [REFERENCE]).values()) == {0.0}


def test_score_pretty_printed_json_is_schema_invalid_but_fields_count():
    result = task.score([json.dumps(REFERENCE, indent=2)], [REFERENCE])
    assert result["schema_valid"] == result["exact_match"] == 0.0
    assert all(result[f"field_{k}"] == 1.0 for k in task.KEYS)


def test_score_one_wrong_field():
    predictions = [PERFECT, task.compact({**REFERENCE, "age": "34"}), "not json"]
    result = task.score(predictions, [REFERENCE] * 3)
    assert result["schema_valid"] == pytest.approx(2 / 3)
    assert result["exact_match"] == pytest.approx(1 / 3)
    assert result["field_age"] == pytest.approx(1 / 3)
    assert result["field_name"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------
# preference pairs
# --------------------------------------------------------------------------------------------


def mistake_of(correct, rejected):
    """Which of the task's mistakes ``rejected`` makes, judged from the text alone."""
    parsed = task.parse_output(rejected)
    if parsed is None:
        return "extra_prose" if task.compact(correct) in rejected else None
    if parsed == correct:
        return "key_order" if list(parsed) != list(correct) else None
    if set(parsed) < set(correct):
        (dropped,) = set(correct) - set(parsed)
        return (
            "dropped_null_key"
            if correct[dropped] is None and parsed == {k: v for k, v in correct.items() if k != dropped}
            else None
        )
    differing = [k for k in task.KEYS if parsed.get(k) != correct[k]]
    if list(parsed) != list(task.KEYS) or len(differing) != 1:
        return None
    key, wrong = differing[0], parsed[differing[0]]
    if key == "name" and wrong.endswith(" " + correct["name"]) and wrong.split()[0] in task.TITLES:
        return "title_in_name"
    if key == "date" and not ISO_DATE.fullmatch(wrong) and dates_in(wrong) == {correct["date"]}:
        return "date_format"
    if key == "phone" and not E164.fullmatch(wrong) and re.sub(r"\D", "", wrong)[-10:] == correct["phone"][2:]:
        return "phone_format"
    if key == "email" and wrong.lower() == correct["email"]:
        return "email_case"
    return None


def test_preference_pairs_reject_one_realistic_mistake():
    rows = task.generate_preferences(300, seed=0)
    assert rows == task.generate_preferences(300, seed=0)
    for row in rows:
        (chosen,), (rejected,) = row["chosen"], row["rejected"]
        assert chosen["role"] == rejected["role"] == "assistant"
        assert row["prompt"][0]["content"].startswith(task.USER_PREFIX)
        correct = json.loads(chosen["content"])
        assert tuple(correct) == task.KEYS and chosen["content"] == task.compact(correct)
        assert rejected["content"] != chosen["content"]
        assert mistake_of(correct, rejected["content"]) == row["mistake"]
    assert {row["mistake"] for row in rows} == set(task.MISTAKES)


# --------------------------------------------------------------------------------------------
# the plugin
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), tiny_tokenizer()


def greedy_answer(model, tokenizer, row, max_new_tokens):
    """What ``predict`` must answer for ``row``: no-cache greedy decoding of the prompt, cut
    after the first newline or before the end of the turn."""
    prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with eval_mode(model):
        new = greedy_without_cache(model, ids, max_new_tokens)[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(new, skip_special_tokens=True)
    return text[: text.index("\n") + 1] if "\n" in text else text


def test_predict_gives_greedy_answers_in_row_order_batched_or_alone(tiny):
    model, tokenizer = tiny
    rows = [{"messages": e["messages"]} for e in task.generate_examples(3, seed=5)]
    assert len({len(r["messages"][0]["content"]) for r in rows}) == 3  # so batches need padding
    batched = contacts.predict(model, tokenizer, rows, batch_size=3, max_new_tokens=6)
    assert batched == [greedy_answer(model, tokenizer, row, 6) for row in rows]
    assert all(batched) and any(answer.endswith("\n") for answer in batched), "the newline stop is exercised"
    alone = [contacts.predict(model, tokenizer, [row], batch_size=1, max_new_tokens=6)[0] for row in rows]
    assert batched == alone


def test_eval_metrics_hook_scores_the_eval_rows(tiny):
    model, tokenizer = tiny
    model.train()
    rows = [{"messages": e["messages"]} for e in task.generate_examples(5, seed=6)]
    options = contacts.ContactsOptions(eval_batch_size=2, max_new_tokens=4, eval_limit=3)
    state = SimpleNamespace(
        config=SimpleNamespace(contacts=options), device=torch.device("cpu"), autocast_dtype=None, check_stop=lambda: None
    )
    datasets = Datasets(train=[], eval=[{"row": row} for row in rows], collate=list)
    metrics = contacts.ftengine_eval_metrics(model=model, tokenizer=tokenizer, datasets=datasets, state=state, shots=None)
    assert model.training  # put back as it was
    # The first eval_limit rows, scored against their own answers. (The untrained model writes
    # no JSON, so every metric is 0 here; test_score_* check the scoring itself.)
    answers = [greedy_answer(model, tokenizer, row, 4) for row in rows[:3]]
    prompts = [
        tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False) for row in rows[:3]
    ]
    prompt_tokens = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts) / 3
    assert metrics == task.score(answers, [json.loads(row["messages"][-1]["content"]) for row in rows[:3]]) | {
        "prompt_tokens": prompt_tokens
    }


def test_few_shot_prompts_put_the_shots_as_earlier_turns(tiny):
    model, tokenizer = tiny
    rows = [{"messages": e["messages"]} for e in task.generate_examples(4, seed=7)]
    shots = [rows[0]["messages"], rows[1]["messages"]]
    with_shots = [{"messages": shots[0] + shots[1] + row["messages"]} for row in rows[2:]]
    assert contacts.prompts_of(tokenizer, rows[2:], shots) == contacts.prompts_of(tokenizer, with_shots)
    answers = contacts.predict(model, tokenizer, rows[2:], batch_size=2, max_new_tokens=5, shots=shots)
    assert answers == [greedy_answer(model, tokenizer, row, 5) for row in with_shots]


def test_config_section_rejects_unknown_keys():
    registered = {}
    contacts.ftengine_config_section(register=registered.__setitem__)
    assert registered == {"contacts": contacts.ContactsOptions}
    assert contacts.ContactsOptions().eval_batch_size == 16
    with pytest.raises(ValueError, match="eval_batch_sise\n  Extra inputs are not permitted"):
        contacts.ContactsOptions(eval_batch_sise=8)
