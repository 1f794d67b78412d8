"""A second, independent held-out evaluation set for the "contacts" task.

Written by an engineer who was given only the output contract (the docstring of
``ftengine_contacts.task`` and the conventions in ``examples/contacts/README.md``) and who
never opened the training generator, the first held-out generator (``heldout.py``), their tests,
or any data file under ``examples/contacts/data``. Only ``KEYS``, ``compact`` and
``user_message`` are imported from the task module, so the rows have the same shape; every kind
of message, frame, name, city, spelling and piece of noise here is this module's own. The set
therefore measures how a fine-tuned model does on wording nobody tuned for::

    from ftengine_contacts.fresh import generate_fresh, write_fresh
    rows = generate_fresh(100, seed=7)        # [{"messages": [user, assistant]}, ...]
    write_fresh("examples/contacts/data")     # -> examples/contacts/data/fresh.jsonl

Sixteen kinds of message (``KINDS``): an RSVP reply, a clinic front-desk note, a rental inquiry,
a volunteer sign-up form, a sports-league registration, a hotel shift log, a recruiter's
screening bullets, an OCR'd business card with a note from its back, a support-call transcript,
a classified listing, a pet-adoption application, an invoice, a courier waybill, a friend's
referral, a pasted spreadsheet row (comma, tab, pipe or semicolon) and a text-message thread.

What varies: the fields given (each with its own probability, about 60% overall; forms sometimes
mark a missing one with ``n/a``, ``-``, ``?``, ``TBD`` or an empty cell) and their order; names
from about 140 given names and 100 surnames of many origins (hyphenated and multi-part surnames,
middle initials or names, suffixes, a title that suits the name on about one in six); about 110
cities of the United States, Canada and Mexico; 16 phone spellings; 18 date spellings (weekdays
that match the date, ordinals, abbreviations, numeric US and ISO orders, sometimes lowercase);
e-mail addresses from the name or from a made-up handle (always a handle when the name is not
given, so the address gives no name away), typed with capitals or in all caps now and then; ages
as digits or, about one in eight, in words. Other people (staff, senders, captains, landlords,
drivers) appear with their own names, phones and e-mails, always framed as theirs, and a message
never holds a second date, city or age that could be the contact's.

E-mail addresses use reserved domains only; names and phone numbers are random draws
(``NXX-NXX-XXXX``, ``N`` = 2-9, no ``N11``), not anyone's details.
"""

import datetime as dt
import json
import random
import re
from pathlib import Path

from ftengine.checkpoint import atomic_write_text

from .task import KEYS, compact, user_message

FILENAME = "fresh.jsonl"
DEFAULT_SEED = 20261130


def _words(text):
    return tuple(text.split())


# --- pools -----------------------------------------------------------------------------------

# Given names of many origins, by the titles and middle names that suit them.
GIVEN_F = _words(
    "Adaeze Folake Ngozi Akosua Zawadi Imani Selam Hiwot Layla Rania Samira Shirin Parisa Elif Zeynep "
    "Priyanka Kavya Meera Anjali Lakshmi Tahmina Hira Xiaoling Mei Yuting Seoyeon Hyejin Yui Ayaka Linh "
    "Ngoc Maricel Rowena Ploy Ayu Ximena Valentina Guadalupe Rocio Larissa Beatriz Giulia Chiara Amelie "
    "Solene Friederike Annika Femke Sanne Sigrid Linnea Agnieszka Oksana Natalia Eleni Dimitra Niamh "
    "Eilidh Carys Brooke Margaret Dolores Tamar Leilani Mary-Kate Marie-Claude"
)
GIVEN_M = _words(
    "Chidi Tunde Emeka Kwabena Kofi Baraka Dawit Karim Yousef Tariq Dariush Navid Emre Burak Arjun Rohan "
    "Sanjay Vikram Karthik Anik Bilal Wei Haoran Minjun Haruto Kenji Takumi Quang Jerome Somchai Budi "
    "Alejandro Mateo Joaquin Esteban Thiago Joao Matteo Lorenzo Baptiste Etienne Lukas Jonas Joris Anders "
    "Eskil Krzysztof Wojciech Dmitri Yaroslav Stavros Ciaran Ruairi Rhys Dwayne Cody Harold Wendell Eitan "
    "Keoni Jean-Luc"
)
GIVEN_X = _words("Jun Jiho Thanh Tyler Noa Kalani Ji-woo Shelby Sasha Remy")
GIVEN = GIVEN_F + GIVEN_M + GIVEN_X
GENDER = {**dict.fromkeys(GIVEN_F, "f"), **dict.fromkeys(GIVEN_M, "m"), **dict.fromkeys(GIVEN_X, "x")}

SURNAMES = _words(
    "Adeyemi Okonkwo Mensah Asante Kimani Wanjiru Tesfaye Haddad Khalil Mansour Farahani Tehrani "
    "Yilmaz Demir Chaudhry Iyer Raghunathan Banerjee Malhotra Siddiqui Chowdhury Zhang Liu Huang Xu "
    "Guo Park Choi Jang Yamada Takahashi Matsumoto Fujita Pham Vo Bautista Santos Reyes Villanueva "
    "Srisuk Wijaya Hartono Herrera Castaneda Ibarra Quintero Zuniga Pereira Carvalho Moretti Bianchi "
    "Russo Ferraro Lefebvre Girard Marchand Beaulieu Hoffmann Schreiber Krueger Vogel Visser Jansen "
    "Lindqvist Halvorsen Nyberg Kowalczyk Wisniewski Nowicki Volkov Shevchenko Petrenko Papadakis "
    "Konstantinou Gallagher McAllister O'Donovan Fitzgerald MacLeod Pritchard Llewellyn Whitfield "
    "Brennan Hawthorne Goldberg Ben-David Friedman Kahananui Akana Begay D'Amico Al-Sayed Ng Le"
) + ("de Groot", "Dela Cruz", "St. Pierre", "Van Horn", "De Luca", "da Silva", "El Amrani")

MIDDLE = {
    "f": _words("Rose Marie Grace Ann Nia Lee Kai"),
    "m": _words("James Amir Jose Tomas Ray Lee Kai"),
    "x": _words("Lee Kai"),
}
SUFFIXES = ("Jr.", "Sr.", "II", "III", "IV")
TITLES = {
    "f": ("Dr.", "Dr", "Prof.", "Ms.", "Ms", "Mrs.", "Mx."),
    "m": ("Dr.", "Dr", "Prof.", "Mr.", "Mr", "Mx."),
    "x": ("Dr.", "Prof.", "Mx."),
}
SALUTATION = {"f": "Ms.", "m": "Mr.", "x": "Mx."}

CITIES = (
    # United States
    "Tucson", "Albuquerque", "Boise", "Spokane", "Des Moines", "Omaha", "Wichita", "Little Rock",
    "Baton Rouge", "Chattanooga", "Knoxville", "Savannah", "Asheville", "Providence", "Worcester",
    "Burlington", "Ann Arbor", "Grand Rapids", "Duluth", "Fargo", "Sioux Falls", "Rapid City",
    "Cheyenne", "Missoula", "Bozeman", "Santa Fe", "El Paso", "Corpus Christi", "Lubbock",
    "Shreveport", "Pensacola", "Tallahassee", "St. Petersburg", "Fort Lauderdale", "Winston-Salem",
    "Wilkes-Barre", "Scranton", "Syracuse", "Poughkeepsie", "New Haven", "Bangor", "Anchorage",
    "Fairbanks", "Honolulu", "Hilo", "Walla Walla", "Eau Claire", "La Crosse", "South Bend",
    "Fort Wayne", "Dayton", "Toledo", "Kalamazoo", "Peoria", "Cedar Rapids", "Salt Lake City",
    "Flagstaff", "Las Cruces", "San Luis Obispo", "Santa Cruz", "Bakersfield", "Eugene", "Tacoma",
    "Bellingham", "Palm Springs",
    # Canada
    "Kelowna", "Kamloops", "Nanaimo", "Red Deer", "Lethbridge", "Saskatoon", "Moose Jaw", "Brandon",
    "Thunder Bay", "Sudbury", "Peterborough", "Guelph", "Kitchener", "Sherbrooke", "Gatineau",
    "Rimouski", "Fredericton", "Moncton", "Charlottetown", "Halifax", "Yellowknife", "Whitehorse",
    "Iqaluit", "St. Catharines", "Niagara-on-the-Lake", "Rouyn-Noranda",
    # Mexico
    "Oaxaca", "Puebla", "Merida", "Hermosillo", "Culiacan", "Mazatlan", "Morelia", "Queretaro",
    "Aguascalientes", "San Luis Potosi", "Tlaxcala", "Veracruz", "Saltillo", "Torreon", "Ensenada",
    "Tampico", "Zacatecas", "Cuernavaca", "Ciudad Juarez", "Playa del Carmen",
)  # fmt: skip

STREETS = _words("Alder Quarry Juniper Larkspur Tamarack Hollis Dunmore Pemberton Foxglove Wren Cobalt Heron")
STREET_TYPES = ("St", "Ave", "Rd", "Lane", "Ct", "Blvd", "Way")
HANDLE_A = _words("quiet swift amber lucky north copper velvet rusty salty misty brave lazy")
HANDLE_B = _words("fox otter heron maple comet pixel tiger sparrow badger cactus lantern kite")
DOMAINS = (
    "example.com", "example.org", "example.net", "mail.example.com", "inbox.example.org",
    "corp.example.net", "ridgeline.example", "bluepine.example", "harborview.test", "quillworks.test",
    "tannery.example", "saltmarsh.test",
)  # fmt: skip
MONTHS = _words("January February March April May June July August September October November December")
WEEKDAYS = _words("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")
ONES = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen"
)
TENS = _words("_ _ twenty thirty forty fifty sixty seventy eighty ninety")


def age_in_words(age):
    """``34`` -> ``"thirty-four"`` (1 to 99)."""
    if age < 20:
        return ONES[age]
    tens, ones = divmod(age, 10)
    return TENS[tens] + ("-" + ONES[ones] if ones else "")


# --- field spellings ---------------------------------------------------------------------------


def _random_phone(rng):
    """Ten NANP digits: NXX (not N11) + NXX (not N11) + XXXX."""
    while True:
        area = f"{rng.randint(2, 9)}{rng.randint(0, 9)}{rng.randint(0, 9)}"
        exch = f"{rng.randint(2, 9)}{rng.randint(0, 9)}{rng.randint(0, 9)}"
        if area[1:] != "11" and exch[1:] != "11":
            return area + exch + f"{rng.randint(0, 9999):04d}"


PHONE_STYLES = (
    "({a}) {b}-{c}", "{a}-{b}-{c}", "{a}.{b}.{c}", "{a} {b} {c}", "+1 {a} {b} {c}", "+1 ({a}) {b}-{c}",
    "1-{a}-{b}-{c}", "+1-{a}-{b}-{c}", "{a}{b}{c}", "+1{a}{b}{c}", "({a}){b}-{c}", "1 ({a}) {b}-{c}",
    "1.{a}.{b}.{c}", "+1 {a}-{b}-{c}", "{a}-{b}{c}", "({a}) {b} {c}",
)  # fmt: skip


def spell_phone(rng, digits):
    return rng.choice(PHONE_STYLES).format(a=digits[:3], b=digits[3:6], c=digits[6:])


def _ordinal(day):
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def spell_date(rng, date):
    """One of many spellings of ``date``; numeric ones are US month/day/year."""
    m, d, y = date.month, date.day, date.year
    month, mon = MONTHS[m - 1], MONTHS[m - 1][:3]
    if mon == "Sep" and rng.random() < 0.5:
        mon = "Sept"
    wd = WEEKDAYS[date.weekday()]
    styles = (
        f"{month} {d}, {y}",
        f"{month} {d} {y}",
        f"{mon} {d}, {y}",
        f"{mon}. {d}, {y}",
        f"{d} {month} {y}",
        f"{d} {mon} {y}",
        f"{wd}, {month} {d}, {y}",
        f"{wd[:3]} {mon} {d} {y}",
        f"{month} {_ordinal(d)}, {y}",
        f"the {_ordinal(d)} of {month} {y}",
        f"{m:02d}/{d:02d}/{y}",
        f"{m}/{d}/{y}",
        f"{m}-{d}-{y}",
        f"{m:02d}.{d:02d}.{y}",
        f"{y}-{m:02d}-{d:02d}",
        f"{y}/{m:02d}/{d:02d}",
        f"{d:02d}-{mon.upper()[:3]}-{y}",
        f"{wd} {m}/{d}/{y}",
    )
    text = rng.choice(styles)
    if rng.random() < 0.08 and not text[0].isdigit():
        text = text.lower()
    return text


def _email_local(rng, given, surname, from_name=True):
    if not from_name:  # a nameless subject's address must not give a name away
        return f"{rng.choice(HANDLE_A)}{rng.choice(('', '.', '_'))}{rng.choice(HANDLE_B)}{rng.randint(1, 999)}"
    g = re.sub(r"[^a-z]", "", given.lower())
    s = re.sub(r"[^a-z]", "", surname.lower())
    options = (
        f"{g}.{s}",
        f"{g[0]}{s}",
        f"{g}{s[0]}",
        f"{g}_{s}",
        f"{s}.{g}",
        f"{g}.{s}{rng.randint(1, 99)}",
        f"{g}{rng.randint(70, 2005)}",
        f"{g}.{s}+{rng.choice(('events', 'work', 'shop', 'mail'))}",
        f"{rng.choice(HANDLE_A)}{rng.choice(HANDLE_B)}{rng.randint(1, 999)}",
        f"{rng.choice(HANDLE_A)}.{rng.choice(HANDLE_B)}",
        f"{s}{g[:2]}",
    )
    return rng.choice(options)


def spell_email(rng, address):
    """``address`` (lowercase) as someone might type it."""
    roll = rng.random()
    if roll < 0.06:
        return address.upper()
    if roll < 0.25:
        local, domain = address.split("@")
        local = ".".join(part[:1].upper() + part[1:] for part in local.split("."))
        return local + "@" + (domain.capitalize() if rng.random() < 0.5 else domain)
    return address


def _age_written(rng, age):
    return age_in_words(age) if rng.random() < 0.12 else str(age)


# --- the subject and other people ---------------------------------------------------------------


class Subject:
    """The person a message is about: the record and the strings the message writes."""

    def __init__(self, rng, present, age_range=(19, 84)):
        given, surname = rng.choice(GIVEN), rng.choice(SURNAMES)
        if rng.random() < 0.08:
            surname = f"{surname}-{rng.choice([s for s in SURNAMES if ' ' not in s and s != surname])}"
        parts = [given]
        roll = rng.random()
        if roll < 0.14:
            parts.append(rng.choice("ABCDEFGHJKLMNPRSTVW") + ".")
        elif roll < 0.22:
            parts.append(rng.choice(MIDDLE[GENDER[given]]))
        parts.append(surname)
        if rng.random() < 0.06:
            parts.append(rng.choice(SUFFIXES))
        self.given = given
        self.full = " ".join(parts)
        self.title = rng.choice(TITLES[GENDER[given]]) if rng.random() < 0.18 else None
        self.digits = _random_phone(rng)
        self.address = f"{_email_local(rng, given, surname, 'name' in present)}@{rng.choice(DOMAINS)}"
        self.date_value = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(0, 3 * 365))
        self.age_value = rng.randint(*age_range)
        self.city_value = rng.choice(CITIES)
        self.present = present
        # What the message writes, or None for a field it does not give.
        self.name = (f"{self.title} {self.full}" if self.title else self.full) if "name" in present else None
        self.age = _age_written(rng, self.age_value) if "age" in present else None
        self.city = self.city_value if "city" in present else None
        self.email = spell_email(rng, self.address) if "email" in present else None
        self.phone = spell_phone(rng, self.digits) if "phone" in present else None
        self.date = spell_date(rng, self.date_value) if "date" in present else None

    def ref(self, fallback):
        """How a third-person sentence names the subject: the first name, or a role noun."""
        return self.given if self.name else fallback

    def record(self):
        return {
            "name": self.full if self.name else None,
            "age": self.age_value if self.age else None,
            "city": self.city if self.city else None,
            "email": self.address if self.email else None,
            "phone": "+1" + self.digits if self.phone else None,
            "date": self.date_value.isoformat() if self.date else None,
        }


class Other:
    """Someone else in the message (staff, sender, landlord), with details of their own."""

    def __init__(self, rng, subject):
        while True:
            given, surname = rng.choice(GIVEN), rng.choice(SURNAMES)
            if given != subject.given and surname not in subject.full:
                break
        self.given = given
        self.full = f"{given} {surname}"
        self.phone = spell_phone(rng, _other_digits(rng, subject))
        while True:
            self.email = f"{_email_local(rng, given, surname)}@{rng.choice(DOMAINS)}"
            if self.email != subject.address:
                break


def _other_digits(rng, subject):
    while True:
        digits = _random_phone(rng)
        if digits != subject.digits:
            return digits


def _pick(rng, bank, subject, **extra):
    """One sentence per present field from ``bank`` (field -> templates), in random order."""
    out = []
    for key in KEYS:
        value = getattr(subject, key)
        if value is not None and key in bank:
            out.append(rng.choice(bank[key]).format(v=value, **extra))
    rng.shuffle(out)
    return out


def _maybe(rng, p, items):
    return [rng.choice(items)] if rng.random() < p else []


def _street(rng):
    return f"{rng.randint(3, 9800)} {rng.choice(STREETS)} {rng.choice(STREET_TYPES)}"


def _code(rng, letters=2, digits=5):
    return "".join(rng.choice("ABCDEFGHJKMNPQRTUVWXYZ") for _ in range(letters)) + "".join(
        str(rng.randint(0, 9)) for _ in range(digits)
    )


def _blank(rng, key):
    """How a form marks a field left empty."""
    return rng.choice(("n/a", "N/A", "-", "", "(not given)", "none", "?") + (("TBD",) if key == "date" else ()))


# --- the kinds of message --------------------------------------------------------------------


def rsvp(rng, s):
    """A reply to an invitation, in the guest's own voice."""
    host = Other(rng, s)
    event = rng.choice(("the reception", "Saturday's engagement party", "the retirement dinner", "the alumni gala"))
    if s.date:
        event = rng.choice(("the reception on {d}", "the {d} gala", "the dinner ({d})", "the open house, {d}")).format(d=s.date)
    bank = {
        "age": ("(I'm {v}, in case the venue asks for ages.)", "I'm {v}, if the venue needs ages for the wristbands."),
        "city": ("I'll be driving in from {v}.", "Coming from {v}, so I might be a few minutes late.", "Flying in from {v} that morning."),
        "email": ("Send the seating chart to {v} please.", "Updates to {v} work best.", "My email is {v}."),
        "phone": ("Text me at {v} if plans change.", "Cell: {v}", "You can reach me on {v} the day of."),
    }  # fmt: skip
    head = rng.choice((f"Hi {host.given},", f"Dear {host.full},", "Hello!", "RSVP:"))
    body = [rng.choice((f"Yes, I'll be at {event}!", f"Count me in for {event}.", f"Happy to confirm I'm attending {event}."))]
    body += _pick(rng, bank, s)
    body += _maybe(rng, 0.5, ("No dietary restrictions.", "I'll bring a plus-one if that's ok.", "Vegetarian meal please."))
    sign = ""
    if s.name:
        sign = rng.choice(("\n\nWarmly,\n{n}", "\n-- {n}", "\nSee you there, {n}", "\n\nThis is {n}, by the way.")).format(
            n=s.name
        )
    return head + "\n" + " ".join(body) + sign


def clinic(rng, s):
    """A front-desk note about a patient's appointment."""
    staff, doctor = Other(rng, s), Other(rng, s)
    who = s.name or "Walk-in patient"
    bank = {
        "age": ("{v} y/o.", "Age {v}.", "Pt is {v}."),
        "city": ("Lives in {v}.", "Home: {v}.", "Resides {v}."),
        "email": ("Portal email {v}.", "Send forms to {v}.", "E: {v}"),
        "phone": ("Best # {v}.", "Callback {v}.", "Pt mobile {v}."),
        "date": ("Appt booked {v}.", "Follow-up on {v}.", "Rescheduled to {v}.", "Next visit {v} at 9:40."),
    }
    reason = rng.choice(("knee pain", "annual physical", "allergy recheck", "sutures out", "flu shot", "B12 injection"))
    lines = [rng.choice(("FRONT DESK NOTE", "Scheduling log", "Msg for Dr. " + doctor.full.split()[-1], "Intake"))]
    lines.append(f"{who} - {reason}. " + " ".join(_pick(rng, bank, s)))
    lines += _maybe(rng, 0.6, (f"Entered by {staff.full}, ext. {rng.randint(100, 899)}.", f"Clinic line {staff.phone}."))
    lines += _maybe(rng, 0.4, ("Copay collected.", "Insurance card on file.", "Needs interpreter.", "Bring imaging CD."))
    return "\n".join(lines)


def rental(rng, s):
    """A prospective tenant writing to a landlord about a listing."""
    landlord = Other(rng, s)
    unit = rng.choice(("the 2BR on", "the basement suite on", "unit 4 at", "the studio on"))
    bank = {
        "name": ("My name is {v}.", "I'm {v}.", "This is {v} reaching out."),
        "age": ("I'm {v} and work full time.", "I'm a {v}-year-old nurse, non-smoker.", "About me: {v}, quiet, no pets."),
        "city": ("I'm relocating from {v}.", "Currently renting in {v}.", "I live in {v} right now."),
        "email": ("My email is {v}.", "Lease paperwork can go to {v}.", "Email {v} is fine."),
        "phone": ("Phone is {v}.", "Best number: {v}.", "Call or text {v}."),
        "date": ("Ideally I'd move in {v}.", "I could sign as early as {v}.", "Is {v} possible for a viewing?"),
    }
    head = rng.choice(
        (
            f"Hi {landlord.given},",
            f"Hello {SALUTATION[GENDER[landlord.given]]} {landlord.full.split()[-1]},",
            "Hi there,",
            "Re: listing",
        )
    )
    text = [f"I saw your ad for {unit} {_street(rng)} and I'm very interested."]
    text += _pick(rng, bank, s)
    text += _maybe(
        rng, 0.5, ("I can provide references.", "Is parking included?", f"The listing said ${rng.randint(9, 29)}50/mo, right?")
    )
    return head + "\n\n" + " ".join(text) + "\n\n" + rng.choice(("Thanks!", "Thank you,", "Best regards"))


def volunteer_form(rng, s):
    """A web sign-up form pasted as label/value lines, with blanks marked."""
    labels = {
        "name": ("Full name", "Name", "Volunteer name"),
        "age": ("Age", "Age (years)", "Your age"),
        "city": ("City", "Home city", "Town/City"),
        "email": ("Email", "E-mail address", "Email address"),
        "phone": ("Phone", "Mobile", "Best phone"),
        "date": ("Start date", "Available from", "Orientation date"),
    }
    rows = []
    for key in KEYS:
        value = getattr(s, key)
        if value is None and rng.random() < 0.45:
            value = _blank(rng, key)
        if value is not None:
            rows.append(f"{rng.choice(labels[key])}: {value}".rstrip())
    rng.shuffle(rows)
    rows += _maybe(
        rng, 0.7, ("Shift preference: weekends", "T-shirt size: M", "Role: food sorting", "Languages: English, Tagalog")
    )
    head = rng.choice(
        ("New volunteer submission", "== Food Bank Volunteer Form ==", "Form response #" + str(rng.randint(200, 999)))
    )
    return head + "\n" + "\n".join(rows)


def league(rng, s):
    """A recreational sports league's registration confirmation."""
    captain = Other(rng, s)
    sport = rng.choice(
        ("co-ed softball", "pickleball ladder", "Tuesday night curling", "adult soccer (div. B)", "ultimate frisbee")
    )
    who = s.name or "A new player"
    bank = {
        "age": ("Player age: {v}.", "Listed age {v} (adult bracket).", "{v} years old per waiver."),
        "city": ("Plays out of {v}.", "Home club city: {v}.", "Hometown on file: {v}."),
        "email": ("Schedule emails go to {v}.", "Contact email {v}.", "Login: {v}"),
        "phone": ("Number on the waiver: {v}.", "Player phone {v}.", "Cell {v}."),
        "date": ("First game is {v}.", "Season opener: {v}.", "Registered on {v}."),
    }
    text = [f"{who} is registered for {sport}."] + _pick(rng, bank, s)
    text += _maybe(
        rng, 0.6, (f"Team captain is {captain.full} ({captain.phone}).", f"Questions? Ask {captain.full} at {captain.email}.")
    )
    text += _maybe(
        rng, 0.5, (f"Fee paid: ${rng.randint(40, 160)}.00", "Jersey #" + str(rng.randint(1, 9)) + str(rng.randint(0, 9)))
    )
    return " ".join(text)


def hotel_log(rng, s):
    """A front-desk shift log entry about a guest."""
    clerk = Other(rng, s)
    bank = {
        "name": ("Guest: {v}.", "Reservation under {v}.", "{v} at the desk."),
        "age": ("Guest is {v} (ID checked).", "Age on ID: {v}."),
        "city": ("Home address in {v}.", "Guest from {v}.", "Billing city {v}."),
        "email": ("Folio to {v}.", "Receipt email {v}.", "Guest email: {v}"),
        "phone": ("Guest cell {v}.", "Reach guest at {v}.", "Mobile on file {v}."),
        "date": ("Arrival {v}.", "Checking in {v}.", "Late checkout requested for {v}."),
    }
    text = [rng.choice(("[night audit]", "[AM shift]", "Desk log:", "Note -")), f"Rm {rng.randint(101, 1218)}."]
    text += _pick(rng, bank, s)
    if not s.name:
        text.insert(1, "Guest did not leave a name.")
    text += _maybe(rng, 0.5, ("Wants extra towels.", "Complained about noise from the ice machine.", "Parking pass issued."))
    text += _maybe(rng, 0.5, (f"- {clerk.full}", f"Handed over to {clerk.given}, desk line {clerk.phone}."))
    return " ".join(text)


def recruiter(rng, s):
    """A recruiter's screening-call notes, as bullets."""
    manager = Other(rng, s)
    role = rng.choice(("Data Analyst II", "Warehouse Lead", "Senior Welder", "UX Researcher", "Dental Hygienist"))
    bank = {
        "name": ("Candidate: {v}", "Spoke with {v}", "{v} (referral)"),
        "age": ("Mentioned being {v}", "Age {v}, career changer", "{v} yrs old, wants growth"),
        "city": ("Based in {v}, open to hybrid", "Location: {v}", "Commutes from {v}"),
        "email": ("Email: {v}", "Send offer docs to {v}", "Personal email {v}"),
        "phone": ("Phone {v}", "Prefers calls to {v}", "Cell: {v}"),
        "date": ("Can start {v}", "Notice period ends {v}", "Onsite interview {v}"),
    }
    bullets = _pick(rng, bank, s)
    bullets += _maybe(rng, 0.7, ("Salary expectation mid-range", "Has forklift cert", "Strong SQL", "Asked about remote Fridays"))
    bullets += _maybe(rng, 0.5, (f"Loop in hiring mgr {manager.full} ({manager.email})", f"HM: {manager.full}"))
    bullet = rng.choice(("- ", "* ", "> ", ""))
    return f"Screen - {role}\n" + "\n".join(bullet + b for b in bullets)


def business_card(rng, s):
    """An OCR'd business card, with a handwritten note from the back."""
    company = rng.choice(("Kestrel Freight Co.", "Bramble & Finch LLP", "Northgate Dental", "Orchid Solar", "Pinecrest Realty"))
    job = rng.choice(("Account Executive", "Principal", "Operations Manager", "Broker", "Lead Engineer"))
    lines = [s.name or company.upper()]
    lines.append(job)
    lines.append(company if s.name else "")
    contact = []
    if s.phone:
        contact.append(rng.choice(("M: ", "Cell ", "T. ", "mobile | ")) + s.phone)
    if s.email:
        contact.append(rng.choice(("E: ", "", "email | ")) + s.email)
    if s.city:
        contact.append(f"{_street(rng)}, {s.city}")
    rng.shuffle(contact)
    lines += contact
    lines += _maybe(rng, 0.5, ("www." + rng.choice(DOMAINS), "Fax: on request"))
    note = []
    if s.age:
        note.append(rng.choice(("told me {v}", "{v}, ex-Navy", "age {v}")).format(v=s.age))
    if s.date:
        note.append(rng.choice(("met at trade show {v}", "follow up {v}", "lunch {v}")).format(v=s.date))
    if note:
        rng.shuffle(note)
        lines.append("[back, handwritten:] " + "; ".join(note))
    return rng.choice(("Scanned card:\n", "OCR output >>\n", "")) + "\n".join(x for x in lines if x)


def call_transcript(rng, s):
    """A support-call transcript; the caller is the subject, the agent names themself."""
    agent = Other(rng, s)
    caller = "Caller"
    turns = [f"Agent: Thanks for calling, this is {agent.given}. Who am I speaking with?"]
    if s.name:
        turns.append(f"{caller}: {rng.choice(('Hi, it is', 'Yeah, this is', 'My name is'))} {s.name}.")
    else:
        turns.append(f"{caller}: I'd rather not say, I just have a question about my bill.")
    asks = {
        "age": ("Agent: And your age, for verification?", "{c}: I'm {v}."),
        "city": ("Agent: Which city is the service address in?", "{c}: {v}."),
        "email": ("Agent: Email for the confirmation?", "{c}: It's {v}."),
        "phone": ("Agent: Best callback number?", "{c}: {v}."),
        "date": ("Agent: When did the outage start?", "{c}: On {v}."),
    }
    pairs = [(k, asks[k]) for k in KEYS if k in asks and getattr(s, k)]
    rng.shuffle(pairs)
    for key, (q, a) in pairs:
        turns += [q, a.format(c=caller, v=getattr(s, key))]
    turns += _maybe(rng, 0.5, ("Agent: I've opened ticket " + _code(rng) + " for you.", "Agent: You'll see a credit of $12.40."))
    turns.append(rng.choice(("Caller: Great, thanks.", "Caller: Ok bye.", "Agent: Anything else today?")))
    return "\n".join(turns)


def marketplace(rng, s):
    """A classified listing; the seller is the subject."""
    item = rng.choice(
        ("Oak dining table, 6 chairs", "Kids' bike w/ training wheels", "Canon DSLR + 2 lenses", "Kayak (10ft)", "Upright piano")
    )
    price = f"${rng.randint(2, 90)}0"
    bank = {
        "name": ("Ask for {v}.", "Seller: {v}", "Posted by {v}."),
        "age": ("(I'm {v} and downsizing.)", "Selling because at {v} I finally have no room."),
        "city": ("Pickup in {v} only.", "Located in {v}.", "Meet in {v}, no delivery."),
        "email": ("Email {v} with offers.", "Questions: {v}"),
        "phone": ("Text {v}, no calls please.", "Call {v} after 5pm.", "TXT {v}"),
        "date": ("Must be gone by {v}.", "Available for pickup {v}.", "Moving {v}, first come first served."),
    }
    head = rng.choice((f"FOR SALE: {item} - {price}", f"{item}. {price} OBO", f"[Selling] {item} ({price}, firm)"))
    body = _pick(rng, bank, s)
    body += _maybe(rng, 0.6, ("Smoke-free home.", "Cash or e-transfer.", "Minor scratches, see pics.", "No holds."))
    return head + "\n" + " ".join(body)


def adoption(rng, s):
    """A shelter's summary of an adoption application."""
    staff = Other(rng, s)
    pet = rng.choice(("Biscuit (beagle mix)", "Nori (tabby)", "Pickles (rabbit)", "Moose (lab/shepherd)", "Juniper (calico)"))
    who = s.name or "Applicant (name missing on form)"
    bank = {
        "age": ("Applicant age: {v}.", "States they are {v}.", "{v}, owns home."),
        "city": ("Residence in {v}.", "Lives in {v}, fenced yard.", "City on ID: {v}."),
        "email": ("Email {v}.", "Contract will be emailed to {v}."),
        "phone": ("Phone {v}.", "Reference check can call {v}.", "Text updates to {v}."),
        "date": ("Home visit set for {v}.", "Meet-and-greet {v}.", "Pickup date {v}."),
    }
    text = [f"Adoption app for {pet}: {who}."] + _pick(rng, bank, s)
    text += _maybe(
        rng, 0.6, (f"Reviewed by {staff.full}.", f"Coordinator: {staff.full}, {staff.phone}.", "Other pets: one senior cat.")
    )
    return rng.choice(("", "PAWS RESCUE - ", "Shelter notes: ")) + " ".join(text)


def invoice(rng, s):
    """An invoice; the bill-to party is the subject, the vendor has its own contact details."""
    vendor = Other(rng, s)
    shop = rng.choice(("Copperline Plumbing", "Tidewater Tutoring", "Lumen Photo Studio", "Greenway Lawn Care"))
    lines = [f"{shop} | INVOICE {_code(rng, 3, 4)}", f"Vendor phone {vendor.phone} / {vendor.email}"]
    bill = []
    if s.name:
        bill.append(s.name)
    if s.city:
        bill.append(f"{_street(rng)}, {s.city}")
    if s.email:
        bill.append(s.email)
    if s.phone:
        bill.append("Tel " + s.phone)
    lines.append("BILL TO: " + (" / ".join(bill) if bill else "(walk-in)"))
    if s.age:
        lines.append(f"Customer age {s.age} (senior rate applied)" if s.age_value >= 65 else f"Customer age: {s.age}")
    for _ in range(rng.randint(1, 3)):
        lines.append(
            f"  {rng.choice(('Labor', 'Parts', 'Session', 'Prints', 'Mulch'))} x{rng.randint(1, 4)}  ${rng.randint(15, 400)}.{rng.randint(0, 99):02d}"
        )
    if s.date:
        lines.append(rng.choice(("Due date: {v}", "Payment due {v}", "Service date: {v}")).format(v=s.date))
    lines += _maybe(rng, 0.5, ("Net 30. Thank you for your business!", "Late fee 1.5%/mo."))
    return "\n".join(lines)


def delivery(rng, s):
    """A courier's delivery slip and driver note."""
    driver = Other(rng, s)
    bank = {
        "name": ("Recipient: {v}", "Deliver to {v}", "Consignee {v}"),
        "age": ("Age-restricted item, recipient {v} (verified)", "ID check: {v} yrs"),
        "city": ("Dest. city: {v}", "{street}, {v}", "Drop in {v}"),
        "email": ("Notify {v}", "Tracking emails -> {v}"),
        "phone": ("Recipient ph {v}", "Call on arrival {v}", "Contact # {v}"),
        "date": ("Deliver on {v}", "Scheduled {v}", "ETA {v}"),
    }
    parts = [f"WAYBILL {_code(rng, 2, 8)}"] + _pick(rng, bank, s, street=_street(rng))
    parts += _maybe(rng, 0.6, ("Leave at side door", "Fragile", "2 boxes, 14 kg", "Signature required"))
    parts += _maybe(rng, 0.5, (f"Driver {driver.full}, dispatch {driver.phone}", f"Driver: {driver.given}"))
    return rng.choice((" | ", "\n", "; ")).join(parts)


def referral(rng, s):
    """Someone refers a friend or relative to a business; the friend is the subject."""
    sender = Other(rng, s)
    rel = rng.choice(("my neighbor", "a coworker", "my cousin", "an old friend", "my sister-in-law"))
    who = f"{rel}, {s.name}," if s.name else rel
    bank = {
        "age": ("They're {v} and just getting started.", "{r} is {v}, in case that matters for the plan."),
        "city": ("{r} lives over in {v}.", "{r} is based in {v}."),
        "email": ("{r}'s email is {v}.", "Reach {rl} by email: {v}"),
        "phone": ("{r}'s number is {v}.", "You can call {rl} at {v}."),
        "date": ("{r} is free for a consult on {v}.", "{r} would like to come in {v}."),
    }
    body = [f"I wanted to refer {who} to you."]
    body += _pick(rng, bank, s, r=s.ref(rel[0].upper() + rel[1:]), rl=s.ref(rel))
    body += _maybe(rng, 0.5, ("You did great work on our deck!", "Mention my name for the referral credit.", "No rush at all."))
    sign = rng.choice((f"\n\nThanks, {sender.full}", f"\n- {sender.full} ({sender.phone})", f"\n{sender.full} | {sender.email}"))
    return rng.choice(("Hi!\n", "Hello,\n", "Quick referral:\n")) + " ".join(body) + sign


def spreadsheet_row(rng, s):
    """A header and one row pasted from a spreadsheet, columns in random order."""
    headers = {
        "name": ("Name", "Contact", "full_name"),
        "age": ("Age", "age_yrs", "AGE"),
        "city": ("City", "city", "Location"),
        "email": ("Email", "e-mail", "EMAIL"),
        "phone": ("Phone", "phone_number", "Tel"),
        "date": ("Date", "Next Contact", "signup_date"),
    }
    sep = rng.choice((",", "\t", " | ", ";"))
    cols = []
    for key in KEYS:
        value = getattr(s, key)
        if value is None:
            if rng.random() < 0.5:
                continue
            value = rng.choice(("", "NA", "-"))
        if sep.strip() and sep.strip() in value:
            value = f'"{value}"'
        cols.append((rng.choice(headers[key]), value))
    extras = [
        ("Source", rng.choice(("web", "expo", "cold call"))),
        ("Sales rep", Other(rng, s).given),
        ("ID", str(rng.randint(1000, 99999))),
    ]
    cols += rng.sample(extras, rng.randint(0, 2))
    rng.shuffle(cols)
    return (
        rng.choice(("", "from the sheet:\n", "CSV row -\n")) + sep.join(h for h, _ in cols) + "\n" + sep.join(v for _, v in cols)
    )


def text_thread(rng, s):
    """A text-message thread between the user ("Me") and the subject."""
    label = s.name or s.phone or "Unknown"
    minute = rng.randint(7 * 60, 20 * 60)
    turns = []

    def stamp():
        nonlocal minute
        minute += rng.randint(0, 9)
        hour = (minute // 60 - 1) % 12 + 1
        return f"[{hour}:{minute % 60:02d} {'AM' if minute < 12 * 60 else 'PM'}]"

    turns.append(f"{stamp()} Me: hey! got your number from the group chat, can I add you for the carpool?")
    bank = {
        "name": ("{c}: sure, it's {v} btw", "{c}: yes! {v} here"),
        "age": ("{c}: fyi I'm {v}, so I can drive the rental", "{c}: I'm {v} if the insurance form asks"),
        "city": ("{c}: I'm coming from {v}", "{c}: pick me up in {v}?"),
        "email": ("{c}: email is {v}", "{c}: send the doc to {v}"),
        "phone": ("{c}: new number btw, it's {v}", "{c}: use {v} going forward"),
        "date": ("{c}: is the trip still {v}?", "{c}: I'm free {v}"),
    }
    sender = "Them"
    lines = []
    for key in KEYS:
        value = getattr(s, key)
        if value is not None and key in bank and not (key == "phone" and label == s.phone):
            lines.append(rng.choice(bank[key]).format(c=sender, v=value))
    rng.shuffle(lines)
    turns += [f"{stamp()} {line}" for line in lines]
    turns += _maybe(rng, 0.5, (f"{stamp()} Me: perfect, see you then", f"{stamp()} Them: lol ok"))
    return f"Conversation with {label}\n" + "\n".join(turns)


KINDS = {
    "rsvp": rsvp,
    "clinic": clinic,
    "rental": rental,
    "volunteer_form": volunteer_form,
    "league": league,
    "hotel_log": hotel_log,
    "recruiter": recruiter,
    "business_card": business_card,
    "call_transcript": call_transcript,
    "marketplace": marketplace,
    "adoption": adoption,
    "invoice": invoice,
    "delivery": delivery,
    "referral": referral,
    "spreadsheet_row": spreadsheet_row,
    "text_thread": text_thread,
}

# How often each field is present (about 60% of fields overall).
PRESENCE = {"name": 0.8, "age": 0.5, "city": 0.55, "email": 0.55, "phone": 0.6, "date": 0.6}


def _draw_present(rng):
    while True:
        present = {key for key, p in PRESENCE.items() if rng.random() < p}
        if len(present) >= 2:
            return present


def generate_cases(n, seed=DEFAULT_SEED):
    """``n`` tuples ``(kind, message, record)``; the same seed gives the same cases.

    Kinds cycle through ``KINDS`` in a shuffled order per round, so every kind appears once ``n``
    reaches ``len(KINDS)``; messages are unique.
    """
    rng = random.Random(seed)
    names = list(KINDS)
    cases, seen = [], set()
    order = []
    while len(cases) < n:
        if not order:
            order = rng.sample(names, len(names))
        kind = order.pop()
        while True:
            subject = Subject(rng, _draw_present(rng))
            # "Jr." or "Sept." at the end of a sentence: one period, not two.
            message = re.sub(r"(?<!\.)\.\.(?!\.)", ".", KINDS[kind](rng, subject).strip())
            if message not in seen:
                break
        seen.add(message)
        cases.append((kind, message, subject.record()))
    return cases


def generate_fresh(n, seed=DEFAULT_SEED):
    """``n`` chat rows ``{"messages": [user, assistant]}``."""
    return [
        {"messages": [user_message(message), {"role": "assistant", "content": compact(record)}]}
        for _, message, record in generate_cases(n, seed)
    ]


def write_fresh(directory, n=100, seed=DEFAULT_SEED):
    """Write ``<directory>/fresh.jsonl`` (``n`` rows) atomically and return its path."""
    path = Path(directory) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in generate_fresh(n, seed))
    atomic_write_text(path, text)
    return path
