"""A third held-out evaluation set for the "contacts" task, written blind: ``blind.jsonl``.

How it was written: by a helper engineer (an AI agent started by the project lead for this one
job), from the output contract alone: the module docstring of ``ftengine_contacts.task``,
its ``KEYS``, ``compact`` and ``user_message``, and ``examples/contacts/README.md``. It did not
read the rest of ``task.py`` (the training generator and its templates), ``heldout.py``,
``fresh.py``, any of their tests, or any file under ``examples/contacts/data/``, and nobody has
looked at a model's errors on it. Its kinds of message, name, city and domain pools, phone,
date, age and e-mail spellings and noise are its own.

Eighteen kinds of message (``KINDS``), places where contact details turn up: a plumber's job
ticket, a school pickup authorisation, a dating-profile blurb, a conference badge-scan export, a
lost-and-found log entry, a tenant application, a gym membership card, a podcast guest booking,
a vet appointment text, a line of a wedding guest list, a help-desk ticket, an auction bidder
registration, a club newsletter welcome, a ride receipt, a library card application, a tutoring
inquiry, a terse translated intake note and a moving-quote request. Each message is about one
person, the contact; other people (technicians, dispatchers, parents, landlords, producers,
hosts, clinic staff, plus-ones, agents, clerks, editors, drivers, interpreters, building
managers) may appear with their own names, phones and e-mails, always framed as theirs, and never
with an age, a city or a date. The record follows the contract: the name as written without a
title (middle initials and suffixes kept), the age as an integer, the city as written, the
e-mail lowercased, the phone in E.164 (``+1`` and 10 digits), the one date of the message in ISO
(numeric dates are US month/day/year with 4-digit years), and ``null`` for what the message does
not say (forms sometimes say so: ``n/a``, ``declined``, an empty cell).

Each field is present with its own probability (``PRESENT``: the name in nine messages in ten,
the others in about three in five), every message carries at least two fields, the kinds are
dealt in shuffled rounds so that 100 rows hold every kind, and the same seed gives the same rows.
Names, numbers and addresses are random draws from reserved spaces (``example.com``/``.org``/
``.net``, ``.example``, ``.test``; phones ``NXX-NXX-XXXX`` with ``N`` 2-9 and no ``N11``), not
anyone's details.
"""

import calendar
import datetime
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ftengine.checkpoint import atomic_write_text

from .task import KEYS, compact, user_message

SEED = 20261130  # the seed of the bundled examples/contacts/data/blind.jsonl
ROWS = 100

PRESENT = {"name": 0.9, "age": 0.55, "city": 0.6, "email": 0.6, "phone": 0.65, "date": 0.6}

# --------------------------------------------------------------------------------------------
# Pools
# --------------------------------------------------------------------------------------------

GIVEN = {
    "f": (
        "Amara", "Beatriz", "Chiamaka", "Dagny", "Esperanza", "Farida", "Guadalupe", "Hana", "Ifeoma",
        "Jolene", "Kalani", "Leilani", "Marisol", "Noor", "Oksana", "Priyanka", "Quynh", "Rosalind",
        "Siobhan", "Tamsin", "Ulrike", "Valentina", "Wanjiru", "Xiadani", "Yesenia", "Zainab",
        "Anneliese", "Bronwyn", "Consuelo", "Deepika", "Eun-ji", "Fatoumata", "Gwendolyn", "Hyacinth",
        "Ingrid", "Jacinta", "Keziah", "Ludmila", "Mei-Ling", "Nkechi", "Ottilie", "Perpetua", "Rukmini",
        "Svetlana", "Thandiwe", "Ximena", "Yolanda", "Zofia", "Aroha", "Catalina", "Elif", "Folasade",
        "Giedre", "Halima", "Itzel", "Junko", "Kirra", "Lorelei", "Maeve", "Nadia", "Oona", "Pilar",
        "Rasa", "Saanvi", "Tuyet", "Wren", "Ana-Sofia", "D'Andra",
    ),
    "m": (
        "Abdullahi", "Bogdan", "Cuauhtemoc", "Dashiell", "Emeka", "Fyodor", "Gustavo", "Haruto",
        "Ignatius", "Jomo", "Kwabena", "Lachlan", "Mateus", "Nnamdi", "Osvaldo", "Piotr", "Quentin",
        "Rafferty", "Sione", "Tadeo", "Ugo", "Vikram", "Wendell", "Xavier", "Yusuf", "Zebulon", "Anselm",
        "Bartholomew", "Cormac", "Dmitri", "Eamon", "Florian", "Gideon", "Hamish", "Ishaan", "Joaquin",
        "Kenji", "Leandro", "Magnus", "Nikolai", "Olufemi", "Pascal", "Radomir", "Teodoro", "Uriah",
        "Vusumuzi", "Wiremu", "Yaw", "Zoltan", "Arjun", "Bashir", "Chidi", "Darnell", "Efrain", "Fintan",
        "Grigor", "Hideo", "Imran", "Jean-Luc", "Kofi", "Lorcan", "Mihai", "Nasser", "Obadiah", "Thiago",
        "De'Shawn",
    ),
    "x": (
        "Rowan", "Sage", "Emerson", "Quinn", "Avery", "Marlowe", "Ellis", "Tatum", "Shiloh", "Remy",
        "Sasha", "Kai", "Noa", "Robin", "Ari", "Jules", "Linden", "Blair", "Reese", "Arden",
    ),
}  # fmt: skip
SURNAMES = (
    "Abernathy", "Achterberg", "Adeyemi", "al-Hashimi", "Bachmann", "Balogun", "Bergstrom",
    "Bhattacharya", "Castellanos", "Chukwu", "Cienfuegos", "Dabrowski", "de la Cruz", "Delacroix",
    "Dimitriou", "Eriksen", "Esposito", "Fairweather", "Fitzgerald", "Fonseca", "Gallagher", "Gonzaga",
    "Grzelak", "Haddad", "Halvorsen", "Hashemi", "Ibarra", "Iwasaki", "Jankowski", "Jimenez", "Kamara",
    "Kaur", "Kowalczyk", "Kuznetsov", "Lindqvist", "Lozano", "Lundgren", "MacAllister", "Mahlangu",
    "Marchetti", "Mbatha", "McKinnon", "Moreau", "Mukherjee", "Nakashima", "Nascimento", "Ndiaye",
    "Nguyen", "Novak", "Obi", "O'Sullivan", "Okafor", "Oyelaran", "Papadakis", "Petrov", "Pham",
    "Quispe", "Rahimi", "Ramaswamy", "Rasmussen", "Rivera-Soto", "Rosenthal", "Saavedra", "Sandoval",
    "Sato", "Schreiber", "Shevchenko", "Sokolov", "St. Germain", "Tanaka", "Tavares", "Thibodeaux",
    "Toussaint", "Trujillo", "Uchenna", "Underhill", "Valdivia", "van Rensburg", "Vasquez",
    "Villanueva", "Wainwright", "Wojcik", "Xiong", "Yamamoto", "Yilmaz", "Zamora", "Zielinski",
    "ten Brink", "Abiodun", "Bouchard", "Cardenas", "Dlamini", "Ferreira", "Gallego", "Holmberg",
    "Iyer", "Jaramillo", "Kealoha", "Lefebvre", "Mwangi", "Nakamura", "Oduya", "Pelletier", "Quintero",
    "Sepulveda", "Thorvaldsen", "Uribe", "Vo", "Whitfield", "Yazzie", "Zapata", "Ahn", "Baptiste",
    "Chowdhury", "Dubois", "D'Souza",
)  # fmt: skip
TITLES = {"f": ("Ms.", "Mrs.", "Dr.", "Prof.", "Ms", "Dr"), "m": ("Mr.", "Dr.", "Prof.", "Mr", "Dr"), "x": ("Mx.", "Dr.", "Mx")}
SUFFIXES = {"f": ("II", "III"), "m": ("Jr.", "Sr.", "II", "III", "IV", "Jr"), "x": ("II", "III")}
CITIES = (
    # United States
    "Albuquerque", "Anchorage", "Ann Arbor", "Asheville", "Baton Rouge", "Bismarck", "Boca Raton",
    "Boise", "Bozeman", "Brownsville", "Cedar Rapids", "Chattanooga", "Colorado Springs",
    "Corpus Christi", "Council Bluffs", "Des Moines", "Duluth", "Eau Claire", "El Paso", "Fairbanks",
    "Fargo", "Flagstaff", "Fort Wayne", "Grand Rapids", "Green Bay", "Hilo", "Honolulu", "Juneau",
    "Kalamazoo", "Kansas City", "Knoxville", "La Crosse", "Laredo", "Lubbock", "Missoula",
    "Oklahoma City", "Poughkeepsie", "Port St. Lucie", "Salt Lake City", "Santa Fe", "Savannah",
    "Schenectady", "Scranton", "Shreveport", "Sioux Falls", "Spokane", "Tacoma", "Tallahassee",
    "Traverse City", "Truckee", "Tucson", "Walla Walla", "Wilkes-Barre", "Winston-Salem",
    "Ypsilanti", "Coeur d'Alene", "Hot Springs", "Altoona", "Biloxi", "Muskogee",
    # Canada
    "Charlottetown", "Chicoutimi", "Chilliwack", "Fort McMurray", "Fredericton", "Gatineau",
    "Iqaluit", "Kelowna", "Lethbridge", "Medicine Hat", "Moncton", "Moose Jaw", "Nanaimo",
    "Red Deer", "Rimouski", "Rouyn-Noranda", "Saskatoon", "Sherbrooke", "St. Catharines",
    "Thunder Bay", "Whitehorse", "Yellowknife", "Val-d'Or", "Drummondville", "Corner Brook",
    "Prince George", "Grande Prairie", "Baie-Comeau", "Timmins", "Kamloops",
    # Mexico
    "Ciudad Juarez", "Culiacan", "Hermosillo", "Mazatlan", "Merida", "Oaxaca", "Playa del Carmen",
    "Queretaro", "Saltillo", "San Luis Potosi", "Tuxtla Gutierrez", "Xalapa", "Zacatecas",
    "Aguascalientes", "San Cristobal de las Casas", "Ciudad Obregon", "Tlaquepaque",
)  # fmt: skip
DOMAINS = (
    "example.com", "example.org", "example.net", "mail.example.com", "post.example.net",
    "members.example.org", "inbox.example.com", "lakeshore.example", "bluefin.example",
    "cedarmail.example", "quillpost.example", "harborline.test", "tinroof.test", "northstar.test",
    "pinecone.test", "alumni.example.org",
)  # fmt: skip
HANDLE_WORDS = (
    "maple", "otter", "copper", "juniper", "lantern", "basalt", "sparrow", "tundra", "velvet", "kettle",
    "marble", "pixel", "quartz", "bramble", "cobalt", "thistle", "saffron", "ember", "ridge", "harbor",
)  # fmt: skip
PLUS_TAGS = ("news", "apps", "rent", "gym", "vet", "events", "school", "auction", "tix")
MONTH_ABBR = {9: ("Sept", "Sep")}
ORDINAL = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}
BLANKS = ("n/a", "N/A", "-", "--", "none", "(not given)", "declined", "unknown", "?", "(blank)", "not provided")


# --------------------------------------------------------------------------------------------
# Drawing a contact and spelling their details
# --------------------------------------------------------------------------------------------


def _draw_phone(rng):
    def nxx():
        while True:
            digits = f"{rng.randint(2, 9)}{rng.randint(0, 9)}{rng.randint(0, 9)}"
            if digits[1:] != "11":
                return digits

    return nxx(), nxx(), f"{rng.randint(0, 9999):04d}"


def _spell_phone(rng, parts):
    a, b, c = parts
    return rng.choice(
        (
            f"({a}) {b}-{c}",
            f"{a}-{b}-{c}",
            f"{a}.{b}.{c}",
            f"{a} {b} {c}",
            f"+1 {a} {b} {c}",
            f"+1 ({a}) {b}-{c}",
            f"1-{a}-{b}-{c}",
            f"{a}{b}{c}",
            f"+1{a}{b}{c}",
            f"{a} {b}-{c}",
            f"({a}){b}.{c}",
            f"1 {a} {b} {c}",
            f"+1-{a}-{b}-{c}",
            f"{a}/{b}-{c}",
            f"1 ({a}) {b} {c}",
        )
    )


def _draw_date(rng):
    year = rng.randint(2024, 2028)
    month = rng.randint(1, 12)
    last = calendar.monthrange(year, month)[1]
    day = rng.randint(1, 9) if rng.random() < 0.5 else rng.randint(10, last)
    return datetime.date(year, month, day)


def _spell_date(rng, date):
    y, m, d = date.year, date.month, date.day
    full = calendar.month_name[m]
    abbr = rng.choice(MONTH_ABBR.get(m, (calendar.month_abbr[m],)))
    dotted = abbr if full == abbr else abbr + "."
    ordinal = f"{d}{ORDINAL.get(d, 'th')}"
    spelled = rng.choice(
        (
            f"{full} {d}, {y}",
            f"{abbr} {d}, {y}",
            f"{dotted} {d}, {y}",
            f"{d} {full} {y}",
            f"{full} {ordinal}, {y}",
            f"{abbr} {ordinal} {y}",
            f"the {ordinal} of {full}, {y}",
            f"{m}/{d}/{y}",
            f"{m:02d}/{d:02d}/{y}",
            f"{m}-{d}-{y}",
            f"{m:02d}-{d:02d}-{y}",
            f"{y}-{m:02d}-{d:02d}",
            f"{y}/{m:02d}/{d:02d}",
            f"{calendar.month_abbr[m].upper()} {d:02d} {y}",
            f"{d}-{abbr}-{y}",
            f"{full} {d} {y}",
        )
    )
    weekday = rng.random()
    if weekday < 0.12:
        spelled = f"{calendar.day_name[date.weekday()]}, {spelled}"
    elif weekday < 0.2:
        spelled = f"{calendar.day_abbr[date.weekday()]} {spelled}"
    return spelled


def _local_part(rng, given, surname):
    g = re.sub(r"[^a-z]", "", given.lower())
    s = re.sub(r"[^a-z]", "", surname.lower())
    digits = str(rng.choice((rng.randint(1, 99), rng.randint(1950, 2009), rng.randint(100, 999))))
    word = rng.choice(HANDLE_WORDS)
    local = rng.choice(
        (
            f"{g}.{s}",
            f"{g}{s}",
            f"{g[0]}.{s}",
            f"{g[0]}{s}",
            f"{g}_{s}",
            f"{g}.{s}{digits}",
            f"{s}.{g}",
            f"{g}{digits}",
            f"{s}{g[0]}{digits}",
            f"{word}{g}",
            f"{g}.{word}",
            f"{word}.{s}{digits}",
            f"{word}{rng.choice(HANDLE_WORDS)}{digits}",
        )
    )
    if rng.random() < 0.12:
        local += "+" + rng.choice(PLUS_TAGS)
    return local


def _draw_email(rng, given, surname):
    return f"{_local_part(rng, given, surname)}@{rng.choice(DOMAINS)}"


def _spell_email(rng, email, given, surname):
    """How the address is typed: lowercase mostly, else capitalised parts, all caps, mixed."""
    style = rng.random()
    if style < 0.55:
        return email
    local, domain = email.split("@")
    if style < 0.75:
        g = re.sub(r"[^a-z]", "", given.lower())
        s = re.sub(r"[^a-z]", "", surname.lower())
        for part in sorted({g, s}, key=len, reverse=True):
            local = local.replace(part, part.capitalize(), 1)
        return f"{local}@{domain.capitalize() if rng.random() < 0.4 else domain}"
    if style < 0.88:
        return email.upper()
    return f"{local.upper()}@{domain}"


def _draw_name(rng, gender, avoid=()):
    while True:
        given = rng.choice(GIVEN[gender])
        surname = rng.choice(SURNAMES)
        if rng.random() < 0.06:
            other = rng.choice(SURNAMES)
            if " " not in surname + other and other != surname:
                surname = f"{surname}-{other}"
        if not {given, *re.split(r"[ -]", surname)} & set(avoid):
            return given, surname


@dataclass
class Person:
    """Someone in a message: ``name`` as written (title included), the parts to refer back."""

    gender: str
    given: str
    surname: str
    name: str  # as written, with the title if any
    bare: str  # the record's name: as written without the title
    phone: str | None = None  # as written
    phone_e164: str | None = None
    email: str | None = None  # as written
    email_lower: str | None = None

    @property
    def tokens(self):
        return {self.given, *re.split(r"[ -]", self.surname), *re.split(r"[ -]", self.bare)}


def _draw_person(rng, avoid=(), title_p=0.14, middle_p=0.14, suffix_p=0.05):
    gender = rng.choice(("f", "f", "m", "m", "x"))
    given, surname = _draw_name(rng, gender, avoid)
    parts = [given]
    if rng.random() < middle_p:
        if rng.random() < 0.7:
            parts.append(rng.choice("ABCDEFGHJKLMNPRSTVW") + ".")
        else:
            middle = rng.choice(GIVEN[gender])
            if middle != given and middle not in avoid:
                parts.append(middle)
    parts.append(surname)
    bare = " ".join(parts)
    if rng.random() < suffix_p:
        bare += " " + rng.choice(SUFFIXES[gender])
    name = f"{rng.choice(TITLES[gender])} {bare}" if rng.random() < title_p else bare
    return Person(gender, given, surname, name, bare)


@dataclass
class Contact:
    """The person a message is about: the record and each detail as the message spells it."""

    person: Person
    record: dict
    age: int | None
    city: str | None
    date: str | None  # as written
    others: list = field(default_factory=list)

    @property
    def name(self):
        return self.person.name if self.record["name"] is not None else None

    @property
    def first(self):
        return self.person.given

    @property
    def phone(self):
        return self.person.phone if self.record["phone"] is not None else None

    @property
    def email(self):
        return self.person.email if self.record["email"] is not None else None

    def first_only(self):
        """Name the contact by the given name alone (a profile, a greeting): the record follows."""
        if self.record["name"] is not None:
            self.person.name = self.person.bare = self.record["name"] = self.person.given

    def other(self, rng, phone=False, email=False, title_p=0.2):
        """Someone else in the message, sharing no name, phone or e-mail with the contact."""
        avoid = set(self.person.tokens)
        for other in self.others:
            avoid |= other.tokens
        person = _draw_person(rng, avoid, title_p=title_p, middle_p=0.05, suffix_p=0.02)
        taken = {self.person.phone_e164, *(o.phone_e164 for o in self.others)}
        while phone:
            parts = _draw_phone(rng)
            e164 = "+1" + "".join(parts)
            if e164 not in taken:
                person.phone, person.phone_e164 = _spell_phone(rng, parts), e164
                break
        taken = {self.person.email_lower, *(o.email_lower for o in self.others)}
        while email:
            address = _draw_email(rng, person.given, person.surname)
            if address not in taken:
                person.email, person.email_lower = _spell_email(rng, address, person.given, person.surname), address
                break
        self.others.append(person)
        return person


def _draw_contact(rng):
    while True:
        present = {key: rng.random() < PRESENT[key] for key in KEYS}
        if sum(present.values()) >= 2:
            break
    person = _draw_person(rng)
    record = dict.fromkeys(KEYS)
    age = city = date = None
    if present["name"]:
        record["name"] = person.bare
    if present["age"]:
        age = record["age"] = rng.randint(18, 89)
    if present["city"]:
        city = record["city"] = rng.choice(CITIES)
    if present["email"]:
        address = _draw_email(rng, person.given, person.surname)
        person.email, person.email_lower = _spell_email(rng, address, person.given, person.surname), address
        record["email"] = address
    if present["phone"]:
        parts = _draw_phone(rng)
        person.phone, person.phone_e164 = _spell_phone(rng, parts), "+1" + "".join(parts)
        record["phone"] = person.phone_e164
    if present["date"]:
        when = _draw_date(rng)
        date = _spell_date(rng, when)
        record["date"] = when.isoformat()
    return Contact(person, record, age, city, date)


# --------------------------------------------------------------------------------------------
# Helpers for the kinds
# --------------------------------------------------------------------------------------------


def _blank(rng):
    return rng.choice(BLANKS)


def _form(rng, items, sep="\n", blank_p=0.4, shuffle=True, keep_first=True):
    """``Label: value`` items; an absent value is left out or written as a blank (``n/a``)."""
    items = list(items)
    if shuffle:
        head, rest = (items[:1], items[1:]) if keep_first else ([], items)
        rng.shuffle(rest)
        items = head + rest
    lines = []
    for label, value in items:
        if value is None:
            if rng.random() >= blank_p:
                continue
            value = _blank(rng)
        lines.append(f"{label}{value}")
    return sep.join(lines)


def _sentences(rng, first, middle, last=()):
    middle = [s for s in middle if s]
    rng.shuffle(middle)
    return " ".join([s for s in (*first, *middle, *last) if s])


def _pick(rng, *options):
    return rng.choice(options)


def _money(rng, low=20, high=900):
    return f"${rng.randint(low, high)}.{rng.randint(0, 99):02d}"


def _time(rng):
    return f"{rng.randint(1, 12)}:{rng.choice(('00', '15', '30', '45'))} {rng.choice(('am', 'pm', 'AM', 'PM'))}"


# --------------------------------------------------------------------------------------------
# The kinds of message
# --------------------------------------------------------------------------------------------


def _job_ticket(rng, c):
    tech = c.other(rng, phone=True)
    dispatcher = c.other(rng, email=rng.random() < 0.5, title_p=0)
    issue = _pick(
        rng, "water heater leaking at base", "kitchen sink clogged, disposal hums", "no hot water upstairs",
        "toilet runs all night", "sump pump alarm going off", "low pressure in both showers",
    )  # fmt: skip
    items = [
        ("Customer: ", c.name if c.name else _pick(rng, "(no name left)", "walk-in, name not taken", None)),
        (_pick(rng, "Customer age: ", "Age: "), c.age),
        (_pick(rng, "Service city: ", "City: ", "Town: "), c.city),
        (_pick(rng, "Callback #: ", "Customer phone: ", "Cust. cell: "), c.phone),
        (_pick(rng, "Customer email: ", "Email (invoice to): "), c.email),
        (_pick(rng, "Scheduled: ", "Appt date: ", "Visit: "), c.date),
    ]
    staff = [f"Assigned tech: {tech.name} (cell {tech.phone})"]
    staff.append(
        f"Dispatcher: {dispatcher.name}" + (f", {dispatcher.email}" if dispatcher.email else "") if rng.random() < 0.6 else ""
    )
    head = _pick(rng, f"JOB TICKET #{rng.randint(10000, 99999)}", f"Work order WO-{rng.randint(1000, 9999)} / plumbing")
    body = [head, _form(rng, items), f"Issue: {issue}", *staff]
    if rng.random() < 0.5:
        body.append(_pick(rng, "Gate code at front desk.", f"Quoted {_money(rng, 90, 600)} + parts.", "Dog in yard, call first."))
    return "\n".join(line for line in body if line)


def _school_pickup(rng, c):
    child = c.other(rng, title_p=0)
    parent = c.other(rng, phone=True, title_p=0.1)
    relation = {
        "f": ("aunt", "grandmother", "neighbor", "family friend"),
        "m": ("uncle", "grandfather", "neighbor", "family friend"),
    }
    relation = rng.choice(relation.get(c.person.gender, ("neighbor", "family friend", "godparent")))
    grade = _pick(rng, "1st grade", "2nd grade", "3rd grade", "4th grade", "5th grade", "kindergarten")
    items = [
        ("Authorized adult: ", c.name),
        ("Adult's age: ", c.age),
        ("Adult's phone: ", c.phone),
        ("Adult's email: ", c.email),
        ("Adult lives in: ", c.city),
        (_pick(rng, "Valid from: ", "Effective date: ", "Starting: "), c.date),
    ]
    lines = [
        _pick(rng, "AUTHORIZED PICKUP FORM", "Dismissal - authorized pickup person", "Pickup authorization (front office)"),
        f"Student: {child.given} {child.surname} ({grade}, Room {rng.randint(101, 240)})",
        _form(rng, items),
        f"Relationship to student: {relation}",
        f"Parent/guardian: {parent.name}, {parent.phone}",
    ]
    if rng.random() < 0.4:
        lines.append(
            _pick(rng, "Photo ID required at the door.", "Entered by office staff.", "Car tag #" + str(rng.randint(100, 999)))
        )
    return "\n".join(lines)


def _dating_profile(rng, c):
    if rng.random() < 0.5:
        c.first_only()
    friend = c.other(rng, title_p=0) if rng.random() < 0.4 else None
    name = c.person.bare if c.name else None  # nobody titles themselves on a profile
    opener = [
        _pick(rng, f"Hey, I'm {name}.", f"{name} here.", f"Name's {name}.", f"Hi there, {name} here.") if name else "Hi there!",
    ]
    middle = [
        _pick(
            rng,
            f"{c.age}, never married.",
            f"I'm {c.age}, for the record.",
            f"Age: {c.age}.",
            f"{c.age} and still can't cook rice.",
        )
        if c.age
        else "",
        _pick(rng, f"Based in {c.city}.", f"{c.city} born and raised.", f"Currently living in {c.city}.") if c.city else "",
        _pick(rng, f"Too shy for the app chat? {c.email}", f"Email me: {c.email}") if c.email else "",
        _pick(rng, f"Text me at {c.phone} if we match.", f"My number, if you're brave: {c.phone}.") if c.phone else "",
        _pick(rng, f"Free for a first coffee on {c.date}.", f"Back from a trip on {c.date}, let's plan something after.")
        if c.date
        else "",
        _pick(
            rng,
            "Dog person.",
            "I make a mean lasagna.",
            "Swipe left if you hate karaoke.",
            "Currently reading three books at once.",
        ),
        f"(My best friend {friend.given} {friend.surname} helped write this, so blame them.)" if friend else "",
    ]
    return _sentences(rng, opener, middle)


def _badge_scan(rng, c):
    rep = c.other(rng, email=True, title_p=0)
    company = _pick(rng, "Northwind Labs", "Brightfold Inc.", "Kestrel Analytics", "Olmstead & Pryor", "Tidewater Co-op")
    sep = _pick(rng, "\n", " | ", "; ")
    items = [
        ("Name: ", c.name),
        ("Company: ", company),
        ("Age: ", c.age),
        ("Email: ", c.email),
        ("Phone: ", c.phone),
        ("City: ", c.city),
        (_pick(rng, "Follow up by: ", "Demo booked: ", "Meeting: "), c.date),
    ]
    head = _pick(rng, "Lead export", "BADGE SCAN", "Booth lead")
    head += f" - booth {rng.randint(100, 999)}, scanned {_time(rng)}"
    return f"{head}\n{_form(rng, items, sep=sep)}\nScanned by: {rep.name} <{rep.email}>"


def _lost_found(rng, c):
    officer = c.other(rng, phone=rng.random() < 0.5, title_p=0)
    item = _pick(
        rng,
        "blue umbrella",
        "black wallet, no cash",
        "child's scooter",
        "reading glasses in a red case",
        "set of keys on a fish keychain",
    )
    who = c.name if c.name else _pick(rng, "a claimant who would not give a name", "the owner (name not recorded)")
    parts = [f"Claimed by {who}" + (f", {c.age}" if c.age and rng.random() < 0.5 else "")]
    if c.age and not parts[0].endswith(f", {c.age}"):
        parts.append(_pick(rng, f"Claimant's age: {c.age}.", f"Says they are {c.age}."))
    else:
        parts[0] += "."
    middle = [
        f"Claimant lives in {c.city}." if c.city else "",
        _pick(rng, f"Claimant phone {c.phone}.", f"Reach the claimant on {c.phone}.") if c.phone else "",
        f"Claimant email: {c.email}." if c.email else "",
        _pick(rng, f"Item reported lost {c.date}.", f"Lost on {c.date}, per the claimant.") if c.date else "",
    ]
    tail = [f"Logged by {officer.name}" + (f" (desk {officer.phone})." if officer.phone else ".")]
    head = [f"LOST & FOUND, entry {rng.randint(1000, 9999)}. Item: {item}."]
    return _sentences(rng, head + parts, middle, tail)


def _tenant_application(rng, c):
    landlord = c.other(rng, phone=True)
    employer = c.other(rng, email=True, title_p=0) if rng.random() < 0.5 else None
    unit = f"Unit {rng.randint(1, 9)}{rng.choice('ABCD')}, {rng.randint(10, 990)} Larch St."
    items = [
        ("Applicant name: ", c.name),
        ("Applicant age: ", c.age),
        ("Current city: ", c.city),
        ("Phone: ", c.phone),
        ("Email: ", c.email),
        (_pick(rng, "Requested move-in: ", "Move-in date: "), c.date),
    ]
    lines = [f"RENTAL APPLICATION - {unit}", _form(rng, items), f"Monthly income: ${rng.randint(25, 90)},{rng.randint(0, 9)}00"]
    lines.append(f"Current landlord (reference): {landlord.name}, {landlord.phone}")
    if employer:
        lines.append(f"Employer contact: {employer.name} <{employer.email}>")
    return "\n".join(lines)


def _gym_card(rng, c):
    buddy = c.other(rng, phone=True, title_p=0)
    gym = _pick(rng, "IRONCLAD FITNESS", "Harbor Climbing Gym", "PEAK 24 GYM", "Riverside Rec Center")
    lines = [f"{gym} - MEMBER CARD"]
    lines.append(c.name if c.name else "Member: " + _pick(rng, "(name on back)", "guest pass"))
    items = [
        ("Member #", str(rng.randint(100000, 999999))),
        (_pick(rng, "Joined ", "Member since ", "Start date: "), c.date),
        ("Age ", c.age),
        (_pick(rng, "Home: ", "City: "), c.city),
        ("Tel ", c.phone),
        ("" if c.email else "Email: ", c.email),
        ("In case of emergency: ", f"{buddy.name} {buddy.phone}"),
    ]
    lines.append(_form(rng, items, blank_p=0.15, keep_first=False))
    return "\n".join(lines)


def _podcast_booking(rng, c):
    host = c.other(rng, email=True, title_p=0)
    producer = c.other(rng, phone=True, title_p=0)
    job = _pick(
        rng, "beekeeper", "retired air-traffic controller", "bakery owner", "amateur astronomer", "luthier", "night-shift nurse"
    )
    who = c.name if c.name else "our mystery guest (name under embargo until the episode airs)"
    lead = f"Locked in our guest for ep. {rng.randint(40, 299)}: {who}"
    if c.age and rng.random() < 0.5:
        lead += f", {c.age}"
        age = ""
    else:
        age = f"Guest is {c.age}, if you want to mention it." if c.age else ""
    lead += f", {'an' if job[0] in 'aeiou' else 'a'} {job}" + (f" from {c.city}." if c.city else ".")
    middle = [
        age,
        _pick(rng, f"Recording is set for {c.date}.", f"We tape on {c.date}.") if c.date else "",
        f"Guest email: {c.email}" + "." if c.email else "",
        _pick(rng, f"Guest cell: {c.phone}.", f"You can reach the guest at {c.phone}.") if c.phone else "",
        _pick(rng, "They'll need a mic mailed out.", "Prep doc is in the shared folder.", "Please don't ask about the lawsuit."),
    ]
    header = [f"To: {host.email}\nSubject: guest booking\n\nHi {host.given},\n\n{lead}"]
    sign = [f"\n\n{producer.given}\n{producer.name} | Producer | {producer.phone}"]
    return _sentences(rng, header, middle, sign).replace(" \n", "\n")


def _vet_sms(rng, c):
    vet = c.other(rng, title_p=0)
    clinic = _pick(rng, "Paws & Claws", "Lakeside Animal Hospital", "Dr. Mew's Vet Clinic", "Tall Grass Vet")
    clinic_phone = _spell_phone(rng, _draw_phone(rng))
    pet = _pick(rng, "Biscuit", "Mochi", "Sergeant Pepper", "Luna", "Waffles", "Pickles")
    who = f"Reminder for {c.name}" if c.name else "Reminder"
    when = f"is booked for {c.date} at {_time(rng)}" if c.date else "is due for a checkup"
    middle = [
        _pick(rng, f"Owner age on file: {c.age}.", f"Owner is {c.age}; consent form signed.") if c.age else "",
        _pick(rng, f"We have {c.phone} as your mobile.", f"Texts go to {c.phone}.") if c.phone else "",
        f"Receipt will be emailed to {c.email}." if c.email else "",
        f"House-call area: {c.city}." if c.city else "",
        f"{pet} will see Dr. {vet.given} {vet.surname}.",
    ]
    return _sentences(
        rng, [f"{clinic}: {who}: {pet} {when}."], middle, [f"Reply C to confirm or call the clinic at {clinic_phone}."]
    )


def _guest_list(rng, c):
    plus = c.other(rng, title_p=0.3) if rng.random() < 0.6 else None
    columns = [
        ("guest", c.name),
        ("age", c.age),
        ("city", c.city),
        ("phone", c.phone),
        ("email", c.email),
        (_pick(rng, "rsvp date", "rsvp'd"), c.date),
        ("table", str(rng.randint(1, 30))),
        ("plus-one", plus.name if plus else None),
        ("meal", _pick(rng, "fish", "veg", "chicken", "kids")),
    ]
    head, rest = columns[:1], columns[1:]
    rng.shuffle(rest)
    columns = head + rest if rng.random() < 0.7 else rest[:3] + head + rest[3:]
    sep = _pick(rng, " | ", "\t", ", ", " ; ")
    empty = _pick(rng, "", "-", "n/a")
    cells = [empty if value is None else str(value) for _, value in columns]
    intro = _pick(rng, "Wedding guest list (pasted from the sheet):", "Guest list export, one row:", "From the RSVP tracker:")
    return f"{intro}\n{sep.join(label for label, _ in columns)}\n{sep.join(cells)}"


def _helpdesk_ticket(rng, c):
    agent = c.other(rng, email=True, title_p=0)
    manager = c.other(rng, phone=True, title_p=0.1) if rng.random() < 0.4 else None
    subject = _pick(
        rng, "VPN drops every 10 min", "Printer on 3rd floor eats paper", "Locked out of payroll portal", "New laptop setup"
    )
    requester = c.name if c.name else "(anonymous web form)"
    if c.email:
        requester += f" <{c.email}>"
    items = [
        ("Requester: ", requester),
        ("Callback: ", c.phone),
        ("Office: ", c.city),
        ("Opened: ", c.date),
        ("Assigned: ", f"{agent.name} ({agent.email})"),
    ]
    body = [f"[HD-{rng.randint(20000, 99999)}] {subject}", _form(rng, items, blank_p=0.3)]
    notes = []
    if c.age:
        notes.append(f"Note: requester is {c.age} and asked for large-print instructions.")
    if manager:
        notes.append(f"Escalation contact is the requester's manager, {manager.name}, {manager.phone}.")
    notes.append(_pick(rng, "Tried a reboot already.", "Priority: P3.", "Asset tag LT-" + str(rng.randint(10000, 99999)) + "."))
    rng.shuffle(notes)
    return "\n".join(body) + "\n\n" + " ".join(notes)


def _auction_registration(rng, c):
    clerk = c.other(rng, phone=True, title_p=0)
    items = [
        ("Bidder: ", c.name),
        ("Age: ", c.age),
        ("City: ", c.city),
        ("Tel: ", c.phone),
        ("E-mail: ", c.email),
        ("Sale date: ", c.date),
    ]
    lines = [
        f"BIDDER REGISTRATION - Paddle No. {rng.randint(100, 899)}",
        _form(rng, items, blank_p=0.5),
        f"Deposit: {_money(rng, 100, 2000)} ({_pick(rng, 'card', 'cash', 'wire')})",
        f"Registered by clerk {clerk.name}, {clerk.phone}",
    ]
    if rng.random() < 0.3:
        lines.insert(2, _pick(rng, "Absentee bids on lots 14, 22.", "Phone bidding requested.", "Resale certificate on file."))
    return "\n".join(lines)


def _newsletter(rng, c):
    editor = c.other(rng, email=True, title_p=0)
    club = _pick(
        rng, "Maple Street Garden Club", "Riverside Choir", "Grace Fellowship", "the Lakeview Chess Circle", "Harbor Rowing Club"
    )
    if c.name:
        lead = f"Please welcome {c.name}" + (f" ({c.age})" if c.age and rng.random() < 0.5 else "")
        ref = c.person.given if c.person.name == c.person.bare or rng.random() < 0.5 else c.name
    else:
        lead = "Please welcome a new member (who asked us not to print a name)"
        ref = "Our new member"
    lead += (
        f", who joined {club}" + (f" on {c.date}" if c.date else "") + (f" after moving here from {c.city}." if c.city else ".")
    )
    middle = [
        f"{ref} is {c.age} and already runs the coffee rota." if c.age and f"({c.age})" not in lead else "",
        _pick(rng, f"Say hello at {c.email}.", f"{ref} can be reached at {c.email}.") if c.email else "",
        _pick(rng, f"Rides to events: call {c.phone}.", f"{ref}'s number is {c.phone}.") if c.phone else "",
        _pick(rng, "Bring a dish to share next month.", "Dues are still $15 a year.", "The hall roof is finally fixed!"),
    ]
    sign = [f"-- {editor.name}, newsletter editor ({editor.email})"]
    return _sentences(rng, [_pick(rng, "NEW FACES.", "Welcome corner:", "Member news -"), lead], middle, sign)


def _ride_receipt(rng, c):
    driver = c.other(rng, title_p=0)
    program = _pick(rng, "Senior Ride Program - trip receipt", "Your trip receipt", "RideShare Co. | Receipt")
    items = [
        ("Rider: ", c.name if not c.age or rng.random() < 0.5 else (f"{c.name}, {c.age}" if c.name else None)),
        ("Trip date: ", c.date),
        ("Rider home city: ", c.city),
        ("Rider phone: ", c.phone),
        ("Receipt sent to: ", c.email),
        ("Driver: ", f"{driver.given} {driver.surname[0]}. ({rng.randint(40, 50) / 10} stars)"),
        ("Total: ", _money(rng, 8, 90)),
    ]
    if c.age and not (items[0][1] or "").endswith(f", {c.age}"):
        items.append(("Rider age: ", c.age))
    return f"{program}\n{_form(rng, items, blank_p=0.2)}\nThanks for riding!"


def _library_card(rng, c):
    staff = c.other(rng, title_p=0)
    items = [
        ("Full name: ", c.name),
        ("Age: ", c.age),
        ("City of residence: ", c.city),
        ("Email: ", c.email),
        ("Phone: ", c.phone),
        ("Date: ", c.date),
    ]
    lines = [
        _pick(rng, "Library card application", "PUBLIC LIBRARY - NEW BORROWER", "Card application (branch desk)"),
        _form(rng, items, blank_p=0.5),
        f"Card barcode: 2{rng.randint(10**12, 10**13 - 1)}",
        f"Processed by: {staff.name}",
    ]
    return "\n".join(lines)


def _tutoring_inquiry(rng, c):
    referrer = c.other(rng, email=rng.random() < 0.5, title_p=0) if rng.random() < 0.7 else None
    subject = _pick(rng, "college algebra", "the GED math section", "conversational Japanese", "organic chemistry", "the LSAT")
    opener = f"Hello, my name is {c.name}" if c.name else "Hello,"
    if c.name and c.age and rng.random() < 0.6:
        opener += f" and I'm {c.age}"
        age = ""
    else:
        age = f"I'm {c.age}, so it's been a while since school." if c.age else ""
    opener += "." if c.name else ""
    middle = [
        age,
        f"I'm looking for help with {subject}.",
        f"I live in {c.city}." if c.city else "",
        _pick(rng, f"Could we start on {c.date}?", f"My exam is on {c.date}.") if c.date else "",
        _pick(rng, f"My number is {c.phone}.", f"Text {c.phone} anytime.") if c.phone else "",
        _pick(rng, f"Email works too: {c.email}.", f"Or write to {c.email}.") if c.email else "",
        f"{referrer.name} gave me your name"
        + (f" (that's {referrer.given}'s address: {referrer.email})." if referrer.email else ".")
        if referrer
        else "",
    ]
    sign = [f"Thanks, {c.person.given}" if c.name else "Thanks"]
    return "Subject: tutoring inquiry\n\n" + _sentences(rng, [opener], middle, sign)


def _translated_note(rng, c):
    interpreter = c.other(rng, phone=True, title_p=0)
    lang = _pick(rng, "Spanish", "French", "Portuguese", "Vietnamese", "Tagalog")
    items = [
        ("Name ", c.name),
        ("Age ", f"{c.age} years" if c.age else None),
        ("City ", c.city),
        ("Tel ", c.phone),
        ("Mail ", c.email),
        (_pick(rng, "Visit day ", "Date "), c.date),
    ]
    body = _form(rng, items, sep=_pick(rng, " / ", ". ", "; "), blank_p=0.3)
    return (
        f"[{_pick(rng, 'Translated from', 'auto-translated,', 'interp.')} {lang}] "
        f"{_pick(rng, 'Patient', 'Client', 'Applicant')}. {body}. Interpreter: {interpreter.name}, {interpreter.phone}."
    )


def _moving_quote(rng, c):
    manager = c.other(rng, phone=True)
    size = _pick(rng, "a 2-bedroom apartment", "a studio", "a 3-bedroom house", "a small office", "one piano and some boxes")
    opener = f"Hi, I need a quote to move {size}."
    who = _pick(rng, f"I'm {c.name}", f"This is {c.name}") if c.name else ""
    if who and c.age:
        who += f", {c.age}" if rng.random() < 0.5 else ""
    middle = [
        (who + (f", currently in {c.city}." if c.city else ".")) if who else (f"I'm currently in {c.city}." if c.city else ""),
        f"I'm {c.age}, and can't lift much anymore." if c.age and not who.endswith(f", {c.age}") else "",
        _pick(rng, f"Target date is {c.date}.", f"Lease ends {c.date}.") if c.date else "",
        _pick(rng, f"Reach me at {c.phone}", f"Call or text {c.phone}") + (f" or {c.email}." if c.email else ".")
        if c.phone
        else (f"Email is best: {c.email}." if c.email else ""),
        f"My building manager, {manager.name}, can open the loading dock: {manager.phone}.",
        _pick(rng, "Elevator is tiny.", "Third floor walk-up.", "No rush on the reply."),
    ]
    return _sentences(rng, [opener], middle)


KINDS = {
    "job_ticket": _job_ticket,
    "school_pickup": _school_pickup,
    "dating_profile": _dating_profile,
    "badge_scan": _badge_scan,
    "lost_found": _lost_found,
    "tenant_application": _tenant_application,
    "gym_card": _gym_card,
    "podcast_booking": _podcast_booking,
    "vet_sms": _vet_sms,
    "guest_list": _guest_list,
    "helpdesk_ticket": _helpdesk_ticket,
    "auction_registration": _auction_registration,
    "newsletter": _newsletter,
    "ride_receipt": _ride_receipt,
    "library_card": _library_card,
    "tutoring_inquiry": _tutoring_inquiry,
    "translated_note": _translated_note,
    "moving_quote": _moving_quote,
}


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclass
class Blind:
    """One message: its kind, text, record and the other people in it (for the tests)."""

    kind: str
    text: str
    record: dict
    others: list


def draw_blind(n, seed=SEED):
    """``n`` messages with their kinds; kinds are dealt in shuffled rounds, no message twice."""
    rng = random.Random(f"contacts-blind:{seed}")
    drawn, seen, deck = [], set(), []
    while len(drawn) < n:
        if not deck:
            deck = list(KINDS)
            rng.shuffle(deck)
        kind = deck.pop()
        while True:
            contact = _draw_contact(rng)
            text = KINDS[kind](rng, contact)
            if text not in seen:
                break
        seen.add(text)
        drawn.append(Blind(kind, text, contact.record, contact.others))
    return drawn


def generate_blind(n=ROWS, seed=SEED):
    """``n`` chat rows ``{"messages": [user, assistant]}``: the message and its record."""
    return [
        {"messages": [user_message(b.text), {"role": "assistant", "content": compact(b.record)}]} for b in draw_blind(n, seed)
    ]


def write_blind(directory, n=ROWS, seed=SEED):
    """Write ``blind.jsonl`` (``n`` rows) into ``directory``, atomically; return its path."""
    path = Path(directory) / "blind.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in generate_blind(n, seed)))
    return path
