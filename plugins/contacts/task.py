"""The "contacts" task: a free-text message about a person -> one line of compact JSON.

Pure Python: a seeded generator of training, validation and preference data (written with
``ftengine.checkpoint.atomic_write_text``), and the scoring used by the ``contacts`` evaluation
plugin.

The target is ``json.dumps(record, separators=(",", ":"))`` with the keys of ``KEYS`` in that
order, every key always present:

* ``name``: the person's name as written, without a title (Dr., Ms., Mr., Mrs., Prof.);
* ``age``: an integer;
* ``city``: as written;
* ``email``: lowercased;
* ``phone``: E.164, ``+1`` and 10 digits (every number here is North American);
* ``date``: ISO ``YYYY-MM-DD`` (numeric dates in messages are US month/day/year);

and ``null`` for whatever the message does not say. Emails use reserved example domains and
phones the fictional 555-01xx range, so no real person appears.
"""

import calendar
import datetime
import itertools
import json
import random
from pathlib import Path

from ftengine.checkpoint import atomic_write_text

KEYS = ("name", "age", "city", "email", "phone", "date")
USER_PREFIX = "Extract the contact record as JSON.\n\n"

TITLES_BY_GENDER = {"female": ("Dr.", "Prof.", "Ms.", "Mrs."), "male": ("Dr.", "Prof.", "Mr.")}
TITLES = ("Dr.", "Prof.", "Ms.", "Mrs.", "Mr.")
FEMALE_FIRST_NAMES = (
    "Jane",
    "Priya",
    "Maria",
    "Aisha",
    "Emily",
    "Sofia",
    "Mei",
    "Olivia",
    "Fatima",
    "Hannah",
    "Grace",
    "Chloe",
    "Ana",
    "Yuki",
    "Leila",
    "Nora",
    "Rachel",
    "Zoe",
    "Ingrid",
    "Camila",
    "Amara",
    "Julia",
    "Sarah",
    "Elena",
    "Tamika",
    "Renee",
    "Lucy",
    "Keiko",
    "Divya",
    "Claire",
)
MALE_FIRST_NAMES = (
    "John",
    "Raj",
    "Carlos",
    "Omar",
    "Daniel",
    "Liam",
    "Wei",
    "Noah",
    "Ahmed",
    "Ethan",
    "Lucas",
    "Mateo",
    "Kenji",
    "Samuel",
    "Andre",
    "Marcus",
    "David",
    "Tomas",
    "Hiro",
    "Felix",
    "Kwame",
    "Jamal",
    "Peter",
    "Ivan",
    "Diego",
    "Arjun",
    "Oliver",
    "Sean",
    "Victor",
    "Malik",
)
LAST_NAMES = (
    "Doe",
    "Patel",
    "Garcia",
    "Nguyen",
    "Smith",
    "Okafor",
    "Chen",
    "Kowalski",
    "O'Brien",
    "Rossi",
    "Haddad",
    "Yamamoto",
    "Johansson",
    "Murphy",
    "Silva",
    "Kim",
    "Schmidt",
    "Brown",
    "Martinez",
    "Dubois",
    "Novak",
    "Cohen",
    "Mensah",
    "Ivanova",
    "Park",
    "Lopez",
    "Fischer",
    "Walker",
    "Singh",
    "Reyes",
    "Khan",
    "Tanaka",
    "Bennett",
    "Moreau",
    "Garcia-Lopez",
    "Adeyemi",
    "MacLeod",
    "Lindqvist",
    "Herrera",
    "Wright",
    "Ali",
    "Costa",
    "Hughes",
    "Larsen",
    "Baker",
)
CITIES = (
    "Boston",
    "Toronto",
    "Austin",
    "San Diego",
    "Vancouver",
    "St. Louis",
    "Salt Lake City",
    "New York",
    "Chicago",
    "Denver",
    "Seattle",
    "Portland",
    "Atlanta",
    "Miami",
    "Phoenix",
    "Minneapolis",
    "Montreal",
    "Calgary",
    "Ottawa",
    "Winnipeg",
    "Halifax",
    "Raleigh",
    "Nashville",
    "New Orleans",
    "Pittsburgh",
    "Philadelphia",
    "Baltimore",
    "Detroit",
    "Cleveland",
    "Kansas City",
    "Omaha",
    "Albuquerque",
    "Tucson",
    "Sacramento",
    "Oakland",
    "San Jose",
    "Honolulu",
    "Anchorage",
    "Boise",
    "Spokane",
    "Madison",
    "Buffalo",
    "Providence",
    "Richmond",
    "Charlotte",
    "Tampa",
    "Dallas",
    "Houston",
    "El Paso",
    "Las Vegas",
    "Winston-Salem",
    "Ann Arbor",
    "Santa Fe",
    "Edmonton",
    "Quebec City",
)
AREA_CODES = (
    "617",
    "212",
    "312",
    "415",
    "206",
    "303",
    "512",
    "404",
    "305",
    "416",
    "604",
    "514",
    "403",
    "613",
    "902",
    "702",
    "214",
    "713",
    "503",
    "612",
    "919",
    "615",
    "504",
    "412",
    "215",
    "410",
    "313",
    "216",
    "816",
    "402",
    "505",
    "520",
    "916",
    "510",
    "408",
    "808",
    "907",
    "208",
    "509",
)
EMAIL_DOMAINS = (
    "example.com",
    "example.org",
    "example.net",
    "mail.example.com",
    "company.example",
    "inbox.test",
)

# How often each field is stated; the rest of the time it is null.
FIELD_RATES = {"name": 0.96, "age": 0.5, "city": 0.65, "email": 0.65, "phone": 0.7, "date": 0.55}
TITLE_RATE = 0.18
UPPERCASE_EMAIL_RATE = 0.25

MISTAKES = (
    "date_format",
    "title_in_name",
    "dropped_null_key",
    "extra_prose",
    "phone_format",
    "email_case",
    "key_order",
)


def compact(record):
    """The one-line JSON a model should answer with."""
    return json.dumps(record, separators=(",", ":"))


def user_message(message):
    return {"role": "user", "content": USER_PREFIX + message}


# --------------------------------------------------------------------------------------------
# Drawing a person and how their details are spelled in the message
# --------------------------------------------------------------------------------------------

PRONOUNS = {
    "female": {"subj": "she", "obj": "her", "poss": "her"},
    "male": {"subj": "he", "obj": "him", "poss": "his"},
}


def _ordinal(day):
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _spell_date(rng, date):
    month, month_abbr = calendar.month_name[date.month], calendar.month_abbr[date.month]
    d, m, y = date.day, date.month, date.year
    return rng.choice(
        (
            f"{month} {d}, {y}",
            f"{month_abbr} {d}, {y}",
            f"{month} {_ordinal(d)}, {y}",
            f"{d} {month_abbr} {y}",
            f"{d} {month} {y}",
            f"{m:02d}/{d:02d}/{y}",
            f"{m}/{d}/{y}",
            date.isoformat(),
            f"the {_ordinal(d)} of {month} {y}",
        )
    )


def _spell_phone(rng, area, line):
    return rng.choice(
        (
            f"({area}) 555-{line}",
            f"{area}-555-{line}",
            f"{area}.555.{line}",
            f"+1 {area} 555 {line}",
            f"{area}555{line}",
            f"+1-{area}-555-{line}",
            f"1-{area}-555-{line}",
            f"{area} 555 {line}",
            f"+1 ({area}) 555-{line}",
            f"+1{area}555{line}",
        )
    )


def _email_address(rng, first, last):
    first = "".join(c for c in first.lower() if c.isalnum())
    last = "".join(c for c in last.lower() if c.isalnum())
    local = rng.choice(
        (
            f"{first}.{last}",
            f"{first[0]}{last}",
            f"{first}{last[0]}",
            f"{first}_{last}",
            f"{last}.{first}",
            f"{first}{rng.randrange(10, 100)}",
            f"{first}.{last}{rng.randrange(1, 100)}",
        )
    )
    return f"{local}@{rng.choice(EMAIL_DOMAINS)}"


def _with_uppercase(rng, email):
    """How people sometimes type an address: capitalised parts, or all caps."""
    local, domain = email.split("@")
    style = rng.choice(("title", "title", "local", "upper"))
    if style == "upper":
        return email.upper()
    capitalised_local = ".".join(part.capitalize() for part in local.split("."))
    if style == "local":
        return f"{capitalised_local}@{domain}"
    return f"{capitalised_local}@{domain.capitalize()}"


def _draw_person(rng):
    """A record plus the spellings its fields take in the message.

    Returns ``(record, written, person)``: ``written`` maps a field to its text in the message,
    ``person`` holds the first name and pronouns the templates use.
    """
    while True:
        present = {key: rng.random() < rate for key, rate in FIELD_RATES.items()}
        # A name alone is not a contact record worth extracting.
        if any(present[key] for key in KEYS[1:]):
            break
    gender = rng.choice(("female", "male"))
    first = rng.choice(FEMALE_FIRST_NAMES if gender == "female" else MALE_FIRST_NAMES)
    last = rng.choice(LAST_NAMES)
    middle = f" {rng.choice('ABCDEFGHJKLMNPRSTW')}." if rng.random() < 0.08 else ""
    name = f"{first}{middle} {last}"
    age = rng.randrange(19, 85)
    city = rng.choice(CITIES)
    email = _email_address(rng, first, last)
    area, line = rng.choice(AREA_CODES), f"01{rng.randrange(100):02d}"
    date = datetime.date(rng.randrange(2023, 2027), rng.randrange(1, 13), 1)
    date = date.replace(day=rng.randrange(1, calendar.monthrange(date.year, date.month)[1] + 1))

    written = {}
    if present["name"]:
        title = rng.choice(TITLES_BY_GENDER[gender])
        written["name"] = f"{title} {name}" if rng.random() < TITLE_RATE else name
    if present["age"]:
        written["age"] = str(age)
    if present["city"]:
        written["city"] = city
    if present["email"]:
        written["email"] = _with_uppercase(rng, email) if rng.random() < UPPERCASE_EMAIL_RATE else email
    if present["phone"]:
        written["phone"] = _spell_phone(rng, area, line)
    if present["date"]:
        written["date"] = _spell_date(rng, date)

    values = {"name": name, "age": age, "city": city, "email": email, "phone": f"+1{area}555{line}", "date": date.isoformat()}
    record = {key: values[key] if present[key] else None for key in KEYS}
    return record, written, {"first": first, **PRONOUNS[gender]}


# --------------------------------------------------------------------------------------------
# Message templates. Placeholders: {name} {age} {city} {email} {phone} {date} (as written),
# {first}, and the pronouns {subj} {obj} {poss}.
# --------------------------------------------------------------------------------------------

FIRST_PERSON = {
    "age": ("I'm {age}", "I am {age} years old", "I'm {age} years old", "age {age}"),
    "city": ("I live in {city}", "I'm based in {city}", "I'm in {city}", "I just moved to {city}"),
    "email": ("my email is {email}", "you can email me at {email}", "reach me at {email}", "email: {email}"),
    "phone": ("my number is {phone}", "call me at {phone}", "my cell is {phone}", "phone: {phone}", "text me on {phone}"),
    "date": (
        "I'd like to meet on {date}",
        "I'm available on {date}",
        "my start date is {date}",
        "I can come in on {date}",
        "I'll be free on {date}",
    ),
}
THIRD_PERSON = {
    "age": ("{subj} is {age}", "{subj}'s {age} years old", "age {age}", "{subj} is {age} years old"),
    "city": ("{subj} lives in {city}", "{subj}'s based in {city}", "based in {city}", "located in {city}"),
    "email": ("{poss} email is {email}", "email {email}", "reachable at {email}"),
    "phone": ("{poss} number is {phone}", "cell {phone}", "phone {phone}", "call {obj} at {phone}"),
    "date": ("follow up on {date}", "meeting set for {date}", "{subj} starts on {date}", "callback scheduled for {date}"),
}
TERSE = {
    "age": ("{age} y/o", "age {age}", "{age} yrs", "aged {age}"),
    "city": ("lives in {city}", "from {city}", "{city} area", "based in {city}"),
    "email": ("email {email}", "{email}", "e-mail: {email}"),
    "phone": ("cell {phone}", "{phone}", "ph {phone}", "tel. {phone}"),
    "date": ("next meeting {date}", "follow up {date}", "met on {date}", "call back {date}"),
}
LABELS = {
    "name": ("Name", "Full name", "Contact", "Customer"),
    "age": ("Age",),
    "city": ("City", "Location", "Town"),
    "email": ("Email", "E-mail", "Email address"),
    "phone": ("Phone", "Tel", "Mobile", "Phone number"),
    "date": ("Date", "Follow-up", "Appointment", "Start date", "Preferred date"),
}
BLANKS = ("n/a", "-", "", "none", "(blank)", "N/A")


def _fill(template, written, person):
    return template.format(**written, **person)


def _sentence_case(template, written, person):
    text = _fill(template, written, person)
    # A value keeps its case (an email written in lowercase); a pronoun or a word does not.
    if template.startswith("{") and not template.startswith(("{subj}", "{poss}")):
        return text
    return text[0].upper() + text[1:]


def _clauses(rng, templates, fields, written, person, capitalise):
    fill = _sentence_case if capitalise else _fill
    return [fill(rng.choice(templates[field]), written, person) for field in fields]


def _maybe(rng, choices):
    """One of ``choices`` half of the time, else nothing: context that carries no field."""
    return rng.choice(choices) if rng.random() < 0.5 else ""


def _shuffled_details(rng, written):
    fields = [key for key in KEYS[1:] if key in written]
    rng.shuffle(fields)
    return fields


def _email_message(rng, written, person):
    fields = _shuffled_details(rng, written)
    greeting = rng.choice(("Hi,", "Hello,", "Dear team,", "Hi there,", "Good morning,"))
    if "name" in written and rng.random() < 0.25:
        # A referral: the sender writes about someone else.
        intro = rng.choice(("I'd like to introduce {name}.", "Referring {name} to you.", "Please add {name} to the list."))
        sentences = [_fill(intro, written, person)]
        sentences += [c + "." for c in _clauses(rng, THIRD_PERSON, fields, written, person, True)]
        return f"{greeting} {' '.join(sentences)} Thanks!"
    sentences = []
    if "name" in written:
        intro = rng.choice(("My name is {name}.", "This is {name}.", "I'm {name}, writing about the opening."))
        sentences.append(_fill(intro, written, person))
    else:
        sentences.append(rng.choice(("I'm writing about the open position.", "I saw your listing online.")))
    sentences.append(
        _maybe(
            rng,
            (
                "I'm interested in the apartment on Elm Street.",
                "I saw your post about the weekend workshop.",
                "Following up on our call last week.",
                "I'd love to join the volunteer program.",
            ),
        )
    )
    sentences += [c + "." for c in _clauses(rng, FIRST_PERSON, fields, written, person, True)]
    sign_off = rng.choice(("Thanks,", "Best,", "Regards,"))
    signature = f" {person['first']}" if "name" in written and rng.random() < 0.5 else ""
    return f"{greeting}\n{' '.join(filter(None, sentences))}\n{sign_off}{signature}"


def _note_message(rng, written, person):
    fields = _shuffled_details(rng, written)
    if "name" in written:
        opener = rng.choice(("Met {name} today", "Spoke with {name}", "Note: {name}", "Lunch with {name}", "{name}"))
        opener = _fill(opener, written, person) + _maybe(
            rng,
            (
                " at the trade show",
                " at the school fundraiser",
                " after the conference",
                " at the coffee shop",
                " about the kitchen remodel",
            ),
        )
    else:
        opener = rng.choice(("Walk-in, no name given", "Caller didn't leave a name"))
    clauses = _clauses(rng, TERSE, fields, written, person, False)
    separator = rng.choice((", ", "; ", " - ", ". "))
    return opener + separator + separator.join(clauses) + "."


def _chat_message(rng, written, person):
    fields = _shuffled_details(rng, written)
    if "name" in written and rng.random() < 0.2:
        intro = rng.choice(("my cousin {name} is looking for a place", "fyi {name} wants in"))
        clauses = _clauses(rng, THIRD_PERSON, fields, written, person, False)
    else:
        if "name" in written:
            intro = rng.choice(("hey! it's {name} from the meetup", "hi, {name} here", "hey it's {name}"))
        else:
            intro = rng.choice(("hey, new number", "hi! from the meetup"))
        clauses = _clauses(rng, FIRST_PERSON, fields, written, person, False)
    aside = _maybe(rng, ("sorry for the late reply", "still keen on the bike", "lmk if that works", "great seeing you"))
    if aside:
        clauses.append(aside)
    separator = rng.choice((", ", " - ", ". "))
    ending = rng.choice(("", "!", " :)", " thx"))
    return _fill(intro, written, person) + separator + separator.join(clauses) + ending


def _labelled_lines(rng, written, header, keep_order):
    details = list(KEYS[1:])
    if not keep_order:
        rng.shuffle(details)
    separator = rng.choice(("\n", " | ", "; "))
    show_blanks = rng.random() < 0.4
    lines = []
    for field in ("name", *details):
        label = rng.choice(LABELS[field])
        if field in written:
            lines.append(f"{label}: {written[field]}")
        elif show_blanks:
            lines.append(f"{label}: {rng.choice(BLANKS)}".rstrip())
    return header + separator.join(lines)


def _crm_message(rng, written, person):
    if rng.random() < 0.5:
        header = rng.choice(("CRM note - ", "Lead update: ", "Account note\n", "[CRM] "))
        return _labelled_lines(rng, written, header, keep_order=False)
    fields = _shuffled_details(rng, written)
    subject = _fill("{name}", written, person) if "name" in written else "Unnamed lead"
    lead = rng.choice(("requested a demo", "asked for pricing", "renewed the contract", "called about billing"))
    clauses = _clauses(rng, THIRD_PERSON, fields, written, person, True)
    interest = _maybe(rng, (" Interested in the premium plan.", " Prefers email over calls.", " Warm lead from the webinar."))
    return f"CRM: {subject} {lead}.{interest} " + " ".join(c + "." for c in clauses)


def _form_message(rng, written, person):
    header = rng.choice(
        ("New sign-up\n", "Registration form:\n", "Web form submission\n", "Volunteer application - ", "Newsletter sign-up: ")
    )
    return _labelled_lines(rng, written, header, keep_order=rng.random() < 0.6)


def _voicemail_message(rng, written, person):
    fields = _shuffled_details(rng, written)
    header = rng.choice(("Voicemail transcript: ", "[Voicemail] ", "Transcribed voicemail: "))
    if "name" in written:
        intro = _fill(rng.choice(("Hi, this is {name}", "Hello, um, it's {name}", "Hey, {name} calling")), written, person)
    else:
        intro = "Hi, um, hello"
    reason = rng.choice(("about the apartment", "returning your call", "about the job posting", "regarding my appointment"))
    clauses = _clauses(rng, FIRST_PERSON, fields, written, person, True)
    filler = _maybe(rng, (" Um, anyway.", " Sorry I missed you.", " Hope you're well."))
    return f"{header}{intro}, {reason}.{filler} " + ". ".join(clauses) + ". Thanks, bye."


MESSAGE_KINDS = (_email_message, _note_message, _chat_message, _crm_message, _form_message, _voicemail_message)


def _draw(rng):
    record, written, person = _draw_person(rng)
    message = rng.choice(MESSAGE_KINDS)(rng, written, person)
    return message, record, written


def _unique_draws(seed, exclude):
    """Endless ``(message, record, written)`` draws, no message twice nor in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude)
    while True:
        message, record, written = _draw(rng)
        if message not in seen:
            seen.add(message)
            yield message, record, written


def generate_examples(n, seed, exclude=()):
    """``n`` examples, the same for the same ``seed`` (an int or a str).

    :param exclude: messages not to produce (those of another split).
    :return: dicts with ``message``, ``record`` (keys in ``KEYS`` order) and ``messages`` (the
        chat form written to the JSONL files).
    """
    return [
        {
            "message": message,
            "record": record,
            "messages": [user_message(message), {"role": "assistant", "content": compact(record)}],
        }
        for message, record, _ in itertools.islice(_unique_draws(seed, exclude), n)
    ]


# --------------------------------------------------------------------------------------------
# Preference pairs: the correct answer against a realistic mistake
# --------------------------------------------------------------------------------------------


def _applicable_mistakes(record, written):
    applicable = ["extra_prose", "key_order"]
    if record["date"] is not None:
        applicable.append("date_format")
    if record["phone"] is not None:
        applicable.append("phone_format")
    if record["name"] is not None and written["name"] != record["name"]:
        applicable.append("title_in_name")
    if record["email"] is not None and written["email"] != record["email"]:
        applicable.append("email_case")
    if None in record.values():
        applicable.append("dropped_null_key")
    return applicable


def _mistaken_answer(rng, mistake, record, written):
    wrong = dict(record)
    if mistake == "extra_prose":
        return rng.choice(
            (
                "Here is the contact record:\n{}",
                "Sure! {}",
                "```json\n{}\n```",
                "{}\n\nLet me know if you need anything else.",
            )
        ).format(compact(record))
    if mistake == "key_order":
        keys = list(KEYS)
        while tuple(keys) == KEYS:
            rng.shuffle(keys)
        return compact({key: record[key] for key in keys})
    if mistake == "date_format":
        iso = datetime.date.fromisoformat(record["date"])
        as_written = written["date"]
        wrong["date"] = as_written if as_written != record["date"] else f"{iso:%m/%d/%Y}"
    elif mistake == "phone_format":
        national = record["phone"][2:]
        as_written = written["phone"]
        wrong["phone"] = as_written if as_written != record["phone"] else f"({national[:3]}) {national[3:6]}-{national[6:]}"
    elif mistake == "title_in_name":
        wrong["name"] = written["name"]
    elif mistake == "email_case":
        wrong["email"] = written["email"]
    elif mistake == "dropped_null_key":
        del wrong[rng.choice([key for key in KEYS if record[key] is None])]
    return compact(wrong)


def generate_preferences(n, seed, exclude=()):
    """``n`` preference pairs, the same for the same ``seed``.

    :param exclude: messages not to produce.
    :return: dicts with ``prompt`` (the user turn), ``chosen`` (the correct answer), ``rejected``
        (the same answer with one mistake) and ``mistake`` (its kind, one of ``MISTAKES``).
    """
    rng = random.Random(f"mistakes-{seed}")
    draws = _unique_draws(seed, exclude)
    rows = []
    for _ in range(n):
        mistake = rng.choice(MISTAKES)
        # Draw until a message allows the mistake, so that every kind is about equally common.
        message, record, written = next(d for d in draws if mistake in _applicable_mistakes(*d[1:]))
        rows.append(
            {
                "prompt": [user_message(message)],
                "chosen": [{"role": "assistant", "content": compact(record)}],
                "rejected": [{"role": "assistant", "content": _mistaken_answer(rng, mistake, record, written)}],
                "mistake": mistake,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_splits(directory, n_train=2000, n_valid=200, n_prefs=600, n_prefs_valid=100, seed=0):
    """Write ``train.jsonl``, ``valid.jsonl`` (chat rows) and ``prefs_train.jsonl``,
    ``prefs_valid.jsonl`` (preference rows) into ``directory``.

    Each file comes from its own seed, and no message appears in two files.

    :return: ``{"train": path, "valid": path, "prefs_train": path, "prefs_valid": path}``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    used = set()
    contents = {}
    for split, n in (("train", n_train), ("valid", n_valid)):
        examples = generate_examples(n, f"{split}-{seed}", exclude=used)
        used.update(e["message"] for e in examples)
        contents[split] = [{"messages": e["messages"]} for e in examples]
    for split, n in (("prefs_train", n_prefs), ("prefs_valid", n_prefs_valid)):
        pairs = generate_preferences(n, f"{split}-{seed}", exclude=used)
        used.update(p["prompt"][0]["content"].removeprefix(USER_PREFIX) for p in pairs)
        contents[split] = [{key: p[key] for key in ("prompt", "chosen", "rejected")} for p in pairs]
    paths = {}
    for split, rows in contents.items():
        paths[split] = directory / f"{split}.jsonl"
        # Atomic: a file holds either the old rows or all the new ones.
        atomic_write_text(paths[split], "".join(json.dumps(row) + "\n" for row in rows))
    return paths


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _reject_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def parse_output(text):
    """The JSON object a model answered, or ``None`` when its stripped output is not exactly
    one JSON object (prose around it, a code fence, duplicate keys)."""
    try:
        value = json.loads(text.strip(), object_pairs_hook=_reject_duplicate_keys)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _same(predicted, expected):
    # JSON's 34 and "34", 1 and true, must not count as equal.
    return type(predicted) is type(expected) and predicted == expected


def score(predictions, references):
    """Score model outputs against reference records.

    :param predictions: the model's output texts.
    :param references: the correct records (dicts), in the same order.
    :return: fractions in [0, 1]: ``schema_valid`` (a single line, with no newline even at the
        end, holding a JSON object with exactly ``KEYS`` in order), ``exact_match`` (schema-valid and every field right), and
        ``field_<key>`` (that field right in a parseable object; an unparseable output counts
        wrong for every field).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("nothing to score")
    valid = exact = 0
    field_hits = dict.fromkeys(KEYS, 0)
    for text, reference in zip(predictions, references):
        parsed = parse_output(text)
        if parsed is None:
            continue
        is_valid = tuple(parsed) == KEYS and "\n" not in text.strip(" \t")
        hits = {key: key in parsed and _same(parsed[key], reference[key]) for key in KEYS}
        valid += is_valid
        exact += is_valid and all(hits.values())
        for key, hit in hits.items():
            field_hits[key] += hit
    n = len(references)
    return {
        "schema_valid": valid / n,
        "exact_match": exact / n,
        **{f"field_{key}": hits / n for key, hits in field_hits.items()},
    }
