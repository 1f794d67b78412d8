"""Held-out validation rows for the contacts task, with phrasings the training generator never saw.

Written independently for issue 14 by a helper engineer who never opened the training generator
(``task.py`` beyond the contract), the bundled examples or any data file: only the output contract
(``KEYS``, ``user_message``, ``compact`` and the field rules) was given. Validation rows drawn from
the training generator hide copying errors; these rows measure extraction on unseen wording.

What varies: 16 kinds of message (support ticket, meeting minutes, classified ad, short bio,
calendar invite, delivery note, clinic reminder, forwarded text thread, sales call log, roster line,
recruiter message, landlord note, voicemail transcript, e-mail signature, sign-up form, restaurant
booking), the order of the fields inside each, names from 16 origins (titles, middle initials,
hyphenated, apostrophes, family-name-first and multi-part names), North American cities (multi-word,
hyphens, apostrophes), NANP numbers with arbitrary digits in eleven spellings, dates in thirteen
spellings, a quarter with a weekday in front (abbreviations with and without periods, ordinals, US
numeric, ISO), mixed-case, dotted, numbered and plus-addressed e-mails on reserved domains, ages as
digits in several phrasings ("34", "age 34", "a 34-year-old", "34 yrs", "34 y/o"), and noise: other
people (some with their own phone or e-mail, always labelled as theirs), order and ticket numbers,
prices, rooms, street numbers, times of day. Each round of 16 rows holds every kind once.

Names are ASCII (``compact`` escapes anything else, which would score JSON escaping rather than
extraction). A message never holds a second date, city or age that could be the contact's.

    rows = generate_heldout(200, seed=0)
    path = write_heldout("examples/contacts/data")   # -> .../heldout.jsonl
"""

import datetime
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ftengine.checkpoint import atomic_write_text

from ftengine_contacts.task import KEYS, compact, user_message

# ---------------------------------------------------------------- name pools
# origin: (female given names, male given names, family names, style)
# A family name written "Stem{i|a}" takes -i for men and -a for women (Polish), "{os|ou}" for Greek.
_ORIGINS = {
    "west_african": (
        ["Ama", "Abena", "Efua", "Adaeze", "Chiamaka", "Ngozi", "Fatou", "Aminata", "Yaa", "Folake"],
        ["Kwame", "Kofi", "Kwabena", "Chinedu", "Emeka", "Oluwaseun", "Babatunde", "Moussa", "Ousmane", "Yaw"],
        ["Mensah", "Owusu", "Boateng", "Asante", "Okonkwo", "Adeyemi", "Nwosu", "Diallo", "Ndiaye", "Okafor", "Agyeman"],
        "western",
    ),
    "vietnamese": (
        ["Lan", "Huong", "Mai", "Thao", "Linh", "Ngoc Anh"],
        ["Minh", "Tuan", "Hieu", "Quang", "Bao", "Duc Anh"],
        ["Nguyen", "Tran", "Le", "Pham", "Hoang", "Vo", "Dang", "Bui"],
        "vietnamese",
    ),
    "polish": (
        ["Agnieszka", "Katarzyna", "Magdalena", "Zofia", "Joanna", "Malgorzata"],
        ["Lukasz", "Krzysztof", "Tomasz", "Piotr", "Wojciech", "Grzegorz"],
        ["Nowak", "Wojcik", "Kowalczyk", "Mazur", "Wisniewsk{i|a}", "Zielinsk{i|a}", "Lewandowsk{i|a}", "Kaminsk{i|a}"],
        "western",
    ),
    "indian": (
        ["Priya", "Ananya", "Kavitha", "Deepika", "Meera", "Lakshmi", "Harpreet"],
        ["Arjun", "Rohan", "Vikram", "Sanjay", "Rahul", "Aditya", "Gurpreet"],
        ["Raghunathan", "Iyer", "Chatterjee", "Patel", "Reddy", "Deshpande", "Banerjee", "Nair", "Subramanian", "Sandhu"],
        "western",
    ),
    "arabic": (
        ["Layla", "Noor", "Yasmin", "Rania", "Huda", "Mariam"],
        ["Omar", "Khalid", "Tariq", "Youssef", "Karim", "Hamza"],
        ["Al-Farsi", "Haddad", "El-Amin", "Mansour", "Nasser", "Khoury", "Al-Rashid", "Saleh", "Abu-Zeid"],
        "western",
    ),
    "nordic": (
        ["Sigrid", "Ingrid", "Astrid", "Freja", "Liv", "Maja", "Solveig"],
        ["Bjorn", "Lars", "Henrik", "Anders", "Eirik", "Mikkel", "Torbjorn"],
        ["Haugen", "Lindqvist", "Johansson", "Berg", "Solberg", "Nystrom", "Halvorsen", "Dahl", "Bergstrom"],
        "western",
    ),
    "irish": (
        ["Siobhan", "Niamh", "Aoife", "Saoirse", "Roisin", "Grainne"],
        ["Cian", "Oisin", "Padraig", "Ciaran", "Eoin", "Declan"],
        ["O'Sullivan", "O'Connor", "McCarthy", "Byrne", "Fitzgerald", "O'Donnell", "MacNamara", "{Mac Bhriain|Ni Bhriain}"],
        "western",
    ),
    "korean": (
        ["Seo-yeon", "Ha-eun", "Soo-ah", "Eun-ji", "Ji-woo"],
        ["Min-jun", "Do-yoon", "Jae-hyun", "Sung-min", "Ji-woo"],
        ["Kim", "Park", "Lee", "Choi", "Jung", "Kang", "Yoon", "Han"],
        "korean",
    ),
    "brazilian": (
        ["Ana Beatriz", "Maria Clara", "Larissa", "Fernanda", "Juliana", "Camila"],
        ["Joao Pedro", "Rafael", "Thiago", "Gustavo", "Lucas", "Bruno"],
        ["dos Santos", "da Silva", "Oliveira", "Ferreira", "Carvalho", "Souza", "Almeida", "Ribeiro", "Pereira da Costa"],
        "western",
    ),
    "greek": (
        ["Eleni", "Katerina", "Sofia", "Despina", "Athina"],
        ["Nikos", "Giorgos", "Dimitris", "Yannis", "Stavros"],
        ["Papadopoul{os|ou}", "Georgiou", "Karagianni{s|}", "Nikolaid{is|ou}", "Antonopoul{os|ou}", "Vlachou"],
        "western",
    ),
    "turkish": (
        ["Elif", "Zeynep", "Ayse", "Merve", "Defne"],
        ["Emre", "Burak", "Mehmet", "Can", "Kerem"],
        ["Yildiz", "Demir", "Kaya", "Celik", "Ozturk", "Aydin", "Sahin", "Arslan"],
        "western",
    ),
    "filipino": (
        ["Maricel", "Jasmine", "Rosalinda", "Kristine"],
        ["Jose Miguel", "Rodel", "Jericho", "Arnel"],
        ["Dela Cruz", "Bautista", "Santos", "Reyes", "Villanueva", "Macaraeg"],
        "western",
    ),
    "ethiopian": (
        ["Selam", "Hiwot", "Meron", "Bethlehem"],
        ["Dawit", "Yonas", "Abebe", "Tewodros"],
        ["Tesfaye", "Bekele", "Haile", "Gebremedhin", "Alemu"],
        "western",
    ),
    "chinese": (
        ["Xiaoling", "Mei", "Yuting", "Jing"],
        ["Wei", "Hao", "Zhiwei", "Jun"],
        ["Zhang", "Chen", "Liu", "Huang", "Zhou", "Xu"],
        "western",
    ),
    "mexican": (
        ["Guadalupe", "Ximena", "Maria Fernanda", "Itzel"],
        ["Jose Luis", "Alejandro", "Emiliano", "Diego"],
        ["Hernandez", "Gutierrez", "Ramirez", "de la Garza", "Villarreal", "Castaneda"],
        "western",
    ),
    "scottish_english": (
        ["Fiona", "Harriet", "Imogen", "Kirsty", "Beatrice"],
        ["Alasdair", "Hamish", "Rupert", "Callum", "Jonty"],
        ["MacLeod", "Fairbairn", "Ashworth", "Cavendish", "Drummond", "St. Clair"],
        "western",
    ),
}

_TITLES = {"f": ["Ms.", "Mrs.", "Dr.", "Prof."], "m": ["Mr.", "Dr.", "Prof."]}

_CITIES = [
    "Tucson",
    "Boise",
    "Spokane",
    "Anchorage",
    "Honolulu",
    "Albuquerque",
    "Chattanooga",
    "Omaha",
    "Halifax",
    "Saskatoon",
    "Winnipeg",
    "Kitchener",
    "Mississauga",
    "Yellowknife",
    "Whitehorse",
    "Fresno",
    "Knoxville",
    "Duluth",
    "Savannah",
    "Burlington",
    "Missoula",
    "Lubbock",
    "Dayton",
    "Tacoma",
    "Reno",
    "Regina",
    "San Antonio",
    "Salt Lake City",
    "St. Louis",
    "Winston-Salem",
    "Coeur d'Alene",
    "Thunder Bay",
    "Quebec City",
    "Fort Wayne",
    "Baton Rouge",
    "Sioux Falls",
    "Grand Rapids",
    "Ann Arbor",
    "El Paso",
    "Las Cruces",
    "Red Deer",
    "Des Moines",
    "Little Rock",
    "Santa Fe",
    "Corpus Christi",
    "Colorado Springs",
    "Cedar Rapids",
    "Lake Charles",
    "Kansas City",
    "Virginia Beach",
    "St. John's",
    "Moose Jaw",
    "Trois-Rivieres",
    "San Juan",
    "Wilkes-Barre",
    "Port St. Lucie",
    "Prince George",
    "Sault Ste. Marie",
    "Bowling Green",
    "Fort Collins",
    "Palm Springs",
    "New Haven",
    "Niagara Falls",
    "Charlotte",
    "Laredo",
]

_DOMAINS = [
    "example.com",
    "example.org",
    "example.net",
    "mail.example",
    "inbox.example",
    "post.example",
    "corp.example",
    "uni.example",
    "studio.example",
    "clinic.example",
    "co.example",
]

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]  # fmt: skip
_MON = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sept", "Oct", "Nov", "Dec"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_WKD = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


@dataclass
class _Person:
    name: str  # as the record holds it
    display: str  # as the message first writes it (may carry a title)
    call: str  # how a later sentence refers to them
    given: str
    family: str


def _family(raw, gender):
    if "{" not in raw:
        return raw
    stem, rest = raw.split("{")
    male, female = rest.rstrip("}").split("|")
    return stem + (male if gender == "m" else female)


def _person(rng, *, titled=True):
    origin = rng.choice(sorted(_ORIGINS))
    female, male, families, style = _ORIGINS[origin]
    gender = rng.choice("fm")
    given = rng.choice(female if gender == "f" else male)
    family = _family(rng.choice(families), gender)
    if style == "vietnamese":
        middle = "Thi" if gender == "f" else rng.choice(["Van", "Minh", "Duc", "Thanh"])
        name = rng.choice([f"{family} {middle} {given}", f"{given} {family}", f"{family} {given}"])
        return _Person(name, name, given, given, family)
    if style == "korean":
        given_written = rng.choice([given, given, given.replace("-", "")])
        name = rng.choice([f"{family} {given_written}", f"{given_written} {family}"])
        return _Person(name, name, given_written, given_written, family)
    roll = rng.random()
    if roll < 0.2 and " " not in given:
        name = f"{given} {rng.choice('ABCDEFGHJKLMNPRSTVW')}. {family}"
    elif roll < 0.32:
        second = _family(rng.choice([f for f in families if f != family]), gender)
        family = f"{family}-{second}" if " " not in family + second else f"{family} {second}"
        name = f"{given} {family}"
    else:
        name = f"{given} {family}"
    display = name
    if titled and rng.random() < 0.2:
        display = f"{rng.choice(_TITLES[gender])} {name}"
    return _Person(name, display, given, given, family)


def _other_person(rng, person, taken):
    """Someone who is not the contact: neither given nor family name shared with anyone named so far."""
    while True:
        other = _person(rng, titled=False)
        if not {other.given, other.family} & taken and other.given not in person.name and other.family not in person.name:
            taken.update({other.given, other.family})
            return other


def _other(rng, person, taken):
    other = _other_person(rng, person, taken)
    return rng.choice([other.given, other.name, other.name])


# ---------------------------------------------------------------- field spellings
def _ascii_handle(text):
    return "".join(c for c in text.lower() if c.isalnum())


def _email(rng, person):
    given = _ascii_handle(person.given.split()[0])
    family = _ascii_handle(person.family.split()[-1])
    nn = str(rng.randint(1, 99))
    tag = rng.choice(["work", "home", "news", "shop", "jobs", "clinic", "mail", "club"])
    local = rng.choice(
        [
            f"{given}.{family}",
            f"{given}{family}",
            f"{given[0]}{family}",
            f"{given}_{family}",
            f"{family}.{given}",
            f"{given}{nn}",
            f"{given}.{family}{nn}",
            f"{given}+{tag}",
            f"{given}.{family}+{tag}",
            f"{family}{given[0]}",
            f"{given[0]}.{family}",
            rng.choice(["sunnyside", "trailrunner", "bluekettle", "nightowl", "quietfox", "pixelbaker"]) + nn,
        ]
    )
    written = f"{local}@{rng.choice(_DOMAINS)}"
    case = rng.random()
    if case < 0.15:
        loc, dom = written.split("@")
        written = ".".join(p.capitalize() for p in loc.split(".")) + "@" + dom.capitalize()
    elif case < 0.22:
        written = written.upper()
    elif case < 0.3:
        loc, dom = written.split("@")
        written = loc + "@" + dom.upper()
    return written.lower(), written


def _nanp_digits(rng):
    while True:
        area = f"{rng.randint(2, 9)}{rng.randint(0, 8)}{rng.randint(0, 9)}"
        exchange = f"{rng.randint(2, 9)}{rng.randint(0, 9)}{rng.randint(0, 9)}"
        if area[1:] != "11" and exchange[1:] != "11":
            return area + exchange + f"{rng.randint(0, 9999):04d}"


def _phone_text(rng, d):
    a, b, c = d[:3], d[3:6], d[6:]
    return rng.choice(
        [
            f"({a}) {b}-{c}",
            f"({a}) {b}-{c}",
            f"{a}-{b}-{c}",
            f"{a}-{b}-{c}",
            f"{a}.{b}.{c}",
            f"{a} {b} {c}",
            f"{a}{b}{c}",
            f"+1 {a} {b} {c}",
            f"+1-{a}-{b}-{c}",
            f"1-{a}-{b}-{c}",
            f"1 ({a}) {b}-{c}",
            f"+1{a}{b}{c}",
            f"+1 ({a}) {b}-{c}",
        ]
    )


def _ordinal(n):
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _date_text(rng, date):
    y, m, d = date.year, date.month, date.day
    month, mon = _MONTHS[m - 1], _MON[m - 1]
    if mon == "Sept" and rng.random() < 0.5:
        mon = "Sep"
    mon_dot = mon if mon == "May" else mon + rng.choice([".", ""])
    core = rng.choice(
        [
            f"{m}/{d}/{y}",
            f"{m:02d}/{d:02d}/{y}",
            f"{y}-{m:02d}-{d:02d}",
            f"{month} {d}, {y}",
            f"{month} {_ordinal(d)} {y}",
            f"{month} {_ordinal(d)}, {y}",
            f"{mon_dot} {d}, {y}",
            f"{mon_dot} {d} {y}",
            f"{mon_dot} {_ordinal(d)}, {y}",
            f"{d} {month} {y}",
            f"{d} {mon} {y}",
            f"the {_ordinal(d)} of {month}, {y}",
            f"{d}-{mon}-{y}",
        ]
    )
    prefix = rng.random()
    wd = date.weekday()
    if prefix < 0.15:
        core = f"{_WEEKDAYS[wd]}, {core}"
    elif prefix < 0.25:
        core = f"{_WKD[wd]}{rng.choice(['', '.'])} {core}"
    return core


def _time(rng):
    h, mm = rng.randint(7, 19), rng.choice([0, 15, 30, 45])
    return rng.choice([f"{(h - 1) % 12 + 1}:{mm:02d} {'AM' if h < 12 else 'PM'}", f"{h}:{mm:02d}",
                       f"{(h - 1) % 12 + 1}{'am' if h < 12 else 'pm'}"])  # fmt: skip


def _price(rng, low, high):
    amount = rng.randint(low, high)
    if amount < 200 and rng.random() < 0.4:
        return f"${amount}.{rng.randint(0, 99):02d}"
    return f"${amount:,}"


def _order(rng):
    return rng.choice([f"#{rng.randint(10000, 999999)}", f"#A-{rng.randint(3000, 99999)}", f"no. {rng.randint(3000, 89999)}"])  # fmt: skip


def _room(rng):
    return rng.choice([f"{rng.randint(1, 9)}{rng.choice('ABCD')}", str(rng.randint(101, 940))])


def _street(rng):
    number = rng.choice([rng.randint(12, 1899), rng.randint(2100, 9800)])  # never a year
    return f"{number} {rng.choice(['Maple Ave', 'Birch St', 'Harbor Rd', 'Oakridge Dr', 'Elm Court', 'Lakeview Blvd', '3rd St', 'Cedar Ln'])}"  # fmt: skip


@dataclass
class _Ctx:
    rng: random.Random
    p: _Person
    age: int | None
    city: str | None
    email: str | None  # as written in the message
    phone: str | None  # as written in the message
    date: str | None  # as written in the message
    taken: set

    def other(self):
        return _other(self.rng, self.p, self.taken)

    def other_with_email(self):
        other = _other_person(self.rng, self.p, self.taken)
        return other.name, _email(self.rng, other)[1]

    def other_phone(self):
        return _phone_text(self.rng, _nanp_digits(self.rng))

    def pick(self, *options):
        return self.rng.choice(options)


def _shuffled(rng, parts):
    parts = [p for p in parts if p]
    rng.shuffle(parts)
    return parts


def _sentences(parts):
    return " ".join(p[0].upper() + p[1:] + ("" if p[-1] in ".!?" else ".") for p in parts if p)


# ---------------------------------------------------------------- message kinds
def _support_ticket(c):
    r = c.rng
    head = c.pick(f"Ticket {_order(r)}", f"Support case {r.randint(3000, 9999)}", f"[Helpdesk] #{r.randint(20000, 99999)}")
    issue = c.pick("router keeps dropping", f"charged twice ({_price(r, 12, 300)})", "app crashes at login",
                   f"refund for order {_order(r)}", "password reset loop", "smart thermostat offline")  # fmt: skip
    lines = [f"Customer: {c.p.display}"]
    parts = _shuffled(r, [
        c.age and c.pick(f"Age on the account: {c.age}", f"Customer age {c.age} (for the plan check)"),
        c.city and c.pick(f"Location: {c.city}", f"Writing in from {c.city}"),
        c.email and c.pick(f"Reply-to: {c.email}", f"Account email {c.email}"),
        c.phone and c.pick(f"Callback number: {c.phone}", f"Best phone {c.phone}"),
        c.date and c.pick(f"Wants a technician visit on {c.date}", f"Follow-up due {c.date}"),
    ])  # fmt: skip
    tail = c.pick(
        f"Assigned to {c.other()}",
        "Priority: normal",
        f"Escalated by {c.other()} (tier 2)",
        "cc: agent {} ({})".format(*c.other_with_email()),
    )
    if c.pick(True, False):
        return f"{head} - {issue}\n" + "\n".join(lines + parts + [tail])
    return f"{head}: {issue}. " + _sentences(lines + parts + [tail])


def _meeting_minutes(c):
    r = c.rng
    o1, o2 = c.other(), c.other()
    topic = c.pick("community garden", "Q3 budget", "fundraiser planning", "vendor onboarding", "newsletter")
    head = f"Minutes, {topic} ({c.pick('Room', 'rm.')} {_room(r)}). Present: {o1}, {o2}, and our guest {c.p.display}."
    first = c.p.call
    parts = _shuffled(r, [
        c.city and c.pick(f"{first} joined by video from {c.city}", f"{first} lives in {c.city} and can cover that area"),
        c.age and c.pick(f"{first} ({c.age}) offered to mentor the juniors", f"{first} is {c.age} and qualifies for the fellowship"),
        c.email and f"{o1} to send the deck to {first} at {c.email}",
        c.phone and c.pick(f"{first}'s number for the phone tree: {c.phone}", f"add {first} to the call list at {c.phone}"),
        c.date and c.pick(f"{first} presents the results on {c.date}", f"{first}'s workshop is set for {c.date}"),
    ])  # fmt: skip
    return head + " " + _sentences(parts) + " " + c.pick(f"{o2} books the hall.", f"Budget left: {_price(r, 150, 5000)}.", "")


def _classified_ad(c):
    r = c.rng
    if c.age and r.random() < 0.5:
        first_line = c.pick("ROOM WANTED:", "Roommate wanted -")
        parts = [
            c.pick(f"{c.p.display}, {c.age}, quiet non-smoker", f"{c.p.display}, a {c.age} y/o quiet non-smoker")
            + (f", looking in {c.city}" if c.city else "")
        ]
        if c.date:
            parts.append(f"can move in {c.date}")
        parts.append(f"budget up to {_price(r, 500, 1800)}/month")
    else:
        item = c.pick(
            "oak dresser", "kayak with paddle", "upright piano", "kids' bike", "espresso machine", "snow tires (set of 4)"
        )
        first_line = c.pick(
            f"FOR SALE: {item}, {_price(r, 20, 2500)} obo.", f"{item.capitalize()} for sale, {_price(r, 20, 2500)}."
        )
        parts = [f"seller: {c.p.display}"]
        parts += _shuffled(r, [
            c.city and c.pick(f"pickup in {c.city}", f"located in {c.city}"),
            c.age and f"{c.p.call} is {c.age} and downsizing",
            c.date and c.pick(f"available until {c.date}", f"garage sale on {c.date}"),
        ])  # fmt: skip
    parts += _shuffled(r, [
        c.phone and c.pick(f"call or text {c.phone}", f"text {c.p.call} at {c.phone}"),
        c.email and c.pick(f"serious buyers email {c.email}", f"email {c.email}"),
    ])  # fmt: skip
    return first_line + " " + _sentences(parts) + c.pick(" No scammers.", " Cash only.", "")


def _short_bio(c):
    r = c.rng
    job, known, event = c.pick(
        ("ceramicist", "wood-fired glazes", "next exhibition opens"),
        ("civil engineer", "bridge retrofits", "public talk is"),
        ("jazz bassist", "late-night sets", "next gig is"),
        ("pediatric nurse", "a first-aid course for parents", "next course starts"),
        ("beekeeper", "rescue hives", "honey stand reopens"),
        ("data journalist", "a popular newsletter", "book launch is"),
        ("pastry chef", "laminated doughs", "pop-up bakery opens"),
    )
    style = r.random() if c.age else 1.0
    if style < 0.35:
        intro = f"{c.p.display}, {c.age}, is a {job}"
    elif style < 0.7:
        intro = f"{c.p.display} is a {c.age}-year-old {job}"
    else:
        intro = f"{c.p.display} is a {job}"
    if c.city:
        intro += c.pick(f" based in {c.city}", f" living in {c.city}", f" who moved to {c.city} last year")
    parts = [intro, c.pick(f"{c.p.call} is known for {known}", "two local awards so far",
                           f"featured in issue {r.randint(12, 240)} of the city magazine")]  # fmt: skip
    if style >= 0.7 and c.age:
        parts.append(c.pick(f"{c.p.call} is {c.age}", f"{c.p.call} is {c.age} years old"))
    parts += _shuffled(r, [
        c.date and c.pick(f"{c.p.call}'s {event} on {c.date}", f"{c.p.call} is in town again on {c.date}"),
        c.email and c.pick(f"bookings: {c.email}", f"press inquiries go to {c.email}"),
        c.phone and c.pick(f"reach {c.p.call} at {c.phone}", f"{c.p.call}'s work line: {c.phone}"),
    ])  # fmt: skip
    return _sentences(parts)


def _calendar_invite(c):
    r = c.rng
    event = c.pick("Quarterly review", "Site visit", "Interview loop", "Kickoff", "Board prep", "Portfolio walkthrough")
    org = c.other()
    lines = [f"Invitation: {event}", f"Organizer: {org}"]
    lines += _shuffled(r, [
        c.date and f"When: {c.date}, {_time(r)}",
        f"Where: Room {_room(r)}" + (f" (guest dials in from {c.city})" if c.city else ""),
        f"Guest: {c.p.display}" + (f" <{c.email}>" if c.email else ""),
        c.phone and f"Guest phone: {c.phone}",
        c.age and f"Guest age (for the building pass): {c.age}",
    ])  # fmt: skip
    lines.append("Notes: " + c.pick("agenda attached, bring the signed NDA", "parking validated at the front desk",
                                    f"catering for {r.randint(4, 30)} ordered ({_price(r, 80, 900)})", "badge pickup at reception"))  # fmt: skip
    return "\n".join(lines)


def _delivery_note(c):
    r = c.rng
    head = f"Delivery note, order {_order(r)}: {r.randint(2, 6)} boxes, {c.pick('flat-pack desk', 'groceries', 'tiles', 'medical supplies')}."
    parts = [f"recipient: {c.p.display}"]
    parts += _shuffled(r, [
        c.city and f"address {_street(r)}, {c.city}",
        c.date and c.pick(f"drop-off {c.date} between {_time(r)} and {_time(r)}", f"scheduled for {c.date}"),
        c.phone and f"recipient phone {c.phone}",
        c.email and f"tracking link sent to {c.email}",
        c.age and c.pick(f"adult signature needed; recipient confirmed age {c.age}", f"recipient is a {c.age}-year-old, ID check at the door"),
    ])  # fmt: skip
    driver = f"driver {c.other()}, cell {c.other_phone()} (dispatch use only)" if r.random() < 0.5 else ""
    return head + " " + _sentences(parts + [driver])


def _clinic_reminder(c):
    r = c.rng
    clinic = c.pick("Northside Dental", "Riverbend Family Clinic", "Maple Eye Care", "Harbor Physio")
    parts = [f"{clinic} reminder for patient {c.p.display}" + (f", age {c.age}" if c.age else "")]
    parts += _shuffled(r, [
        c.date and f"visit on {c.date} at {_time(r)}, room {_room(r)}",
        c.city and f"address on file is in {c.city}",
        c.phone and c.pick(f"we'll text {c.phone} the day before", f"phone on file: {c.phone}"),
        c.email and f"forms were emailed to {c.email}",
    ])  # fmt: skip
    parts.append(
        c.pick(f"questions? Front desk {c.other_phone()}", "please arrive 10 minutes early", f"copay {_price(r, 10, 60)}")
    )
    return _sentences(parts)


def _text_thread(c):
    r = c.rng
    sender = _other_person(r, c.p, c.taken)
    friend = sender.given
    who = c.pick("my cousin", "a friend from work", "my old roommate", "the tutor I mentioned")
    lines = [f"{c.pick('Fwd', 'Forwarded')} from {c.pick(sender.name, friend)}:", f"{friend}: this is {c.p.display}, {who}"]
    said = _shuffled(r, [
        c.city and c.pick(f"{c.p.call} lives in {c.city} now", f"based in {c.city}"),
        c.phone and c.pick(f"number is {c.phone}", f"{c.p.call}'s cell {c.phone}"),
        c.email and c.pick(f"email {c.email}", f"{c.p.call} said use {c.email}"),
        c.age and c.pick(f"{c.p.call} is {c.age} btw", f"{c.age} years old, super responsible"),
        c.date and f"free to meet on {c.date}",
    ])  # fmt: skip
    lines += [f"{friend}: {s}" for s in said]
    if r.random() < 0.4:
        lines.append(f"{friend}: (that's not my new number, mine is {c.other_phone()})")
    return "\n".join(lines)


def _sales_call_log(c):
    r = c.rng
    rep = c.other()
    plan = c.pick("premium", "starter", "family", "pro")
    parts = [f"call log {_time(r)}, rep {rep}: spoke with {c.p.display} about the {plan} plan ({_price(r, 9, 199)}/mo)"]
    parts += _shuffled(r, [
        c.city and c.pick(f"lead is in {c.city}", f"{c.p.call} runs a shop in {c.city}"),
        c.phone and c.pick(f"direct line {c.phone}", f"prefers calls at {c.phone}"),
        c.email and f"send the contract to {c.email}",
        c.date and c.pick(f"demo booked for {c.date}", f"follow up on {c.date}"),
        c.age and f"age {c.age} per the form",
    ])  # fmt: skip
    return _sentences(parts)


def _roster_line(c):
    r = c.rng
    club = c.pick("Chess club", "Rowing club", "Choir", "Robotics league", "Pickleball league", "Book club")
    sep = c.pick(" | ", "; ", ", ", " / ")
    cells = _shuffled(r, [
        c.age and c.pick(str(c.age), f"age {c.age}", f"{c.age} yrs"),
        c.city, c.phone, c.email,
        c.date and c.pick(f"joined {c.date}", f"dues paid {c.date}"),
    ])  # fmt: skip
    head = f"{club} roster, row {r.randint(2, 80)} (updated by {c.other()}):"
    foot = c.pick(f"Dues {_price(r, 20, 150)} outstanding.", "Fees waived this season.", f"Locker {_room(r)}.", "")
    return (head + "\n" + sep.join([c.p.display] + cells) + "\n" + foot).strip()


def _recruiter_message(c):
    r = c.rng
    to, sender = c.other().split()[0], c.other()
    role = c.pick("warehouse lead", "frontend developer", "bookkeeper", "line cook", "lab technician")
    parts = [f"hi {to}, sharing a candidate for the {role} role: {c.p.display}"]
    parts += _shuffled(r, [
        c.city and f"{c.p.call} is currently in {c.city}",
        c.date and c.pick(f"can start {c.date}", f"available from {c.date}"),
        c.age and f"{c.p.call} is {c.age}, which matters for the apprenticeship rules",
    ])  # fmt: skip
    reach = [x for x in (c.email, c.phone) if x]
    if reach:
        parts.append(f"best reached at {' or '.join(reach)}")
    parts.append(f"salary ask {_price(r, 16, 65)}/hr")
    if r.random() < 0.4:
        return _sentences(parts) + " - {} ({}), talent team".format(*c.other_with_email())
    return _sentences(parts) + f" - {sender}, talent team"


def _landlord_note(c):
    r = c.rng
    unit = c.pick(f"unit {_room(r)}", f"apartment {_room(r)}", f"the basement suite at {_street(r)}")
    where = f" in {c.city}" if c.city else ""
    start = f" from {c.date}" if c.date else ""
    parts = [f"note for the file: new tenant {c.p.display} takes {unit}{where}{start}", f"rent {_price(r, 700, 3200)}"]
    parts += _shuffled(r, [
        c.phone and f"tenant phone {c.phone}",
        c.email and f"tenant email {c.email}",
        c.age and f"{c.p.call} is {c.age}",
    ])  # fmt: skip
    if r.random() < 0.5:
        parts.append(f"super is {c.other()} at {c.other_phone()}")
    return _sentences(parts)


def _voicemail(c):
    r = c.rng
    parts = [f"voicemail (0:{r.randint(12, 59)}): hi, this is {c.p.display}" + (f", calling from {c.city}" if c.city else "")
             + f", about the {c.pick('quote', 'apartment', 'dog-sitting job', 'insurance claim')}"]  # fmt: skip
    parts += _shuffled(r, [
        c.age and f"I'm {c.age}, if that matters for the form",
        c.phone and c.pick(f"call me back at {c.phone}", f"my cell is {c.phone}"),
        c.email and f"or email me, {c.email}",
        c.date and f"I'm free on {c.date}",
    ])  # fmt: skip
    return _sentences(parts + ["thanks, bye"])


def _email_signature(c):
    r = c.rng
    body = c.pick("Thanks for the quick turnaround on the invoice.", "Attached are the signed forms.",
                  "Happy to help with the move.", "Sorry I missed your call earlier.")  # fmt: skip
    body += " " + c.pick("The parking code is still 4471.", f"My assistant {c.other()} will send the receipts.",
                         "Let me know if anything is missing.", f"Invoice {_order(r)} is settled.")  # fmt: skip
    if c.date:
        body += " " + c.pick(f"See you on {c.date}.", f"Let's lock in {c.date}.")
    if c.age:
        body += f" (For the registration: I'm {c.age}.)"
    sig = [c.pick("Best,", "Cheers,", "Warm regards,", "--"), c.p.display]
    sig += [x for x in (c.city, c.phone, c.email) if x]
    return body + "\n\n" + "\n".join(sig)


def _signup_form(c):
    r = c.rng
    head = c.pick("Volunteer sign-up", "Blood drive registration", "Marathon bib pickup", "Library card form")
    fields = [f"{c.pick('Name', 'Full name')}: {c.p.display}"]
    fields += _shuffled(r, [
        c.age and f"Age: {c.age}",
        c.city and f"{c.pick('City', 'Town', 'Home city')}: {c.city}",
        c.phone and f"{c.pick('Mobile', 'Cell', 'Phone')}: {c.phone}",
        c.email and f"{c.pick('Email', 'E-mail')}: {c.email}",
        c.date and f"{c.pick('Preferred date', 'Shift', 'Start date')}: {c.date}",
    ])  # fmt: skip
    return head + c.pick("\n", " - ") + c.pick("\n", "; ").join(fields) + f"\nEntered by {c.other()}, desk {_room(r)}"


def _reservation(c):
    r = c.rng
    parts = [
        f"booking {_order(r)}: table for {r.randint(2, 12)} under {c.p.display}" + (f", {c.date} at {_time(r)}" if c.date else "")
    ]
    parts += _shuffled(r, [
        c.phone and f"callback {c.phone}",
        c.email and f"confirmation to {c.email}",
        c.city and f"party driving in from {c.city}",
        c.age and f"{c.p.call} ({c.age}) is the birthday guest",
    ])  # fmt: skip
    parts.append(c.pick(f"deposit {_price(r, 20, 200)} paid", "window seat if possible", "one nut allergy"))
    return _sentences(parts)


KINDS = {
    "support_ticket": _support_ticket,
    "meeting_minutes": _meeting_minutes,
    "classified_ad": _classified_ad,
    "short_bio": _short_bio,
    "calendar_invite": _calendar_invite,
    "delivery_note": _delivery_note,
    "clinic_reminder": _clinic_reminder,
    "text_thread": _text_thread,
    "sales_call_log": _sales_call_log,
    "roster_line": _roster_line,
    "recruiter_message": _recruiter_message,
    "landlord_note": _landlord_note,
    "voicemail": _voicemail,
    "email_signature": _email_signature,
    "signup_form": _signup_form,
    "reservation": _reservation,
}

# How often each field is present (the name always is); at least one more is forced.
_PRESENT = {"age": 0.5, "city": 0.7, "email": 0.6, "phone": 0.65, "date": 0.6}


def _example(rng, kind):
    """One (message, record) of ``kind``."""
    person = _person(rng)
    present = {k for k, p in _PRESENT.items() if rng.random() < p}
    if not present:
        present = {rng.choice(sorted(_PRESENT))}
    record = dict.fromkeys(KEYS)
    record["name"] = person.name
    email = phone = date = None
    if "age" in present:
        record["age"] = rng.randint(18, 88)
    if "city" in present:
        record["city"] = rng.choice(_CITIES)
    if "email" in present:
        record["email"], email = _email(rng, person)
    if "phone" in present:
        digits = _nanp_digits(rng)
        record["phone"], phone = "+1" + digits, _phone_text(rng, digits)
    if "date" in present:
        when = datetime.date(2024, 1, 1) + datetime.timedelta(days=rng.randint(0, 5 * 365))
        record["date"], date = when.isoformat(), _date_text(rng, when)
    taken = {person.given, person.family}
    ctx = _Ctx(rng, person, record["age"], record["city"], email, phone, date, taken)
    message = KINDS[kind](ctx).strip()
    return message, record


def generate_heldout(n, seed=0, *, with_kind=False):
    """``n`` chat rows with distinct messages, the same for the same ``seed``.

    Each row is ``{"messages": [user, assistant]}``; ``with_kind=True`` adds ``"kind"`` (the
    message kind) for tests and statistics.
    """
    rng = random.Random(f"contacts-heldout-{seed}")
    rows, seen, deck = [], set(), []
    while len(rows) < n:
        if not deck:  # every kind once per round, in a shuffled order
            deck = sorted(KINDS)
            rng.shuffle(deck)
        kind = deck.pop()
        message, record = _example(rng, kind)
        if message in seen:
            continue
        seen.add(message)
        row = {"messages": [user_message(message), {"role": "assistant", "content": compact(record)}]}
        if with_kind:
            row["kind"] = kind
        rows.append(row)
    return rows


def write_heldout(directory, n=200, seed=0):
    """Write ``heldout.jsonl`` (``n`` rows) into ``directory`` atomically; return its path."""
    path = Path(directory) / "heldout.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in generate_heldout(n, seed)))
    return path
