"""The "contacts" task: a free-text message about a person -> one line of compact JSON.

Pure Python: a seeded generator of training, validation and preference data (written with
``ftengine.checkpoint.atomic_write_text``), and the scoring used by the ``contacts`` evaluation
plugin.

The target is ``json.dumps(record, separators=(",", ":"))`` with the keys of ``KEYS`` in that
order, every key always present:

* ``name``: the person's name as written, without a title (``TITLES``: Dr., Prof., Ms., Mrs.,
  Mr., Mx., also without the period); middle names or initials and a suffix (Jr., III) kept;
* ``age``: an integer;
* ``city``: as written;
* ``email``: lowercased;
* ``phone``: E.164, ``+1`` and 10 digits (every number here is North American);
* ``date``: ISO ``YYYY-MM-DD`` (numeric dates in messages are US month/day/year, 4-digit years);

and ``null`` for whatever the message does not say.

The generator is meant to teach copying, not recall. Names come from large pools of many
origins (hyphenated, with apostrophes, multi-part surnames such as ``van der Berg``) and about a
third of them are built from random syllables; e-mail local parts are built from the name,
from made-up handles (``trellrunner26``, some typed CamelCase), digits and plus tags, and
addresses are often typed with capitals or all caps; cities include long, multi-word and
hard-to-spell ones (``Saint-Jean-sur-Richelieu``, ``Punxsutawney``); phone numbers are random
NANP numbers (``NXX-NXX-XXXX``) in many spellings, and dates take many spellings (weekday
prefixes, abbreviations, ordinals, numeric US dates with slashes, dashes or dots, ``25-NOV-2025``,
``2024/05/11``), with single-digit days made common; some ages are spelled in words
(``thirty-five``, ``Forty two``) and some phones carry an extension (``ext. 214``, ``x3``) that is
not part of the number. About one name in twenty has two surnames or a long made-up one.
Twelve kinds of message (an email, a note, a chat, a CRM note, a form, a voicemail, a
signature block, a phone slip, an order or ticket, a roster line, a short bio, a forwarded
text) come in several frames each, with the fields in random order; ages are sometimes in
apposition (``Kang Ji-woo, 41, ...``, ``Torbjorn (46) ...``). Noise that carries no field is
mixed in: extra sentences, order, room and ticket numbers, prices, and other people's names,
phone numbers and e-mails, always framed as someone else's (``my manager ...``, ``the front
desk ...``) and never equal to the contact's.

About three messages in ten are scenes (``SCENES``, ``SCENE_KINDS``): the record is about one
person, the subject (a customer, guest, patient, candidate, tenant, recipient, new member,
attendee ...), written up among other people with full names, titles and their own phones and
e-mails: a member of staff (a sales rep, a desk clerk, a nurse, a recruiter, a building super,
a driver, a coach, an organiser ...) who may write in the first person and sign, a colleague
or attendee, an author introducing the subject, a forwarder relaying a friend's details, a
secretary taking minutes. The subject may come before or after the staff member, is named in
full once and then by first name or pronoun (a pronoun only when nobody else shares it), and
a detail that only someone else gave (their phone, their e-mail) leaves the field null. Other
people never have an age, a city or a date, so every record stays unambiguous.

Another three in ten are documents (``DOCUMENT_KINDS``): a spreadsheet row pasted under its
header (comma, tab, pipe or semicolon; column names spelled many ways, in any order, with extra
columns and blank cells), an OCR'd business card, an invoice or receipt (the vendor's own phone
and e-mail above the customer billed), a courier waybill (shipper, driver and dispatch numbers
vs the recipient), a chat thread with timestamps and speaker labels, a classified ad, a clinic
intake note entered by staff with an extension, recruiter screening bullets, an RSVP with a
plus-one, a forwarded e-mail whose From/To/Cc people are not the contact, a long e-mail
signature, a social post (maybe under a handle), a handwritten note, and a message to a named
reader (``Hi Rocio,``) whose sender may give no name. About one contact in fourteen is nameless
(half of them with an e-mail handle that reads like words, ``quietfox26``) while the message
names a reader, staff, a vendor or an author. A message whose row would not fit the default
job's 256 tokens is written again in another kind (``MAX_ROUGH_TOKENS``).

E-mail addresses use reserved domains only (``example.com``/``.org``/``.net`` and their
subdomains, names under the ``.example`` and ``.test`` top-level domains); names and phone
numbers are random draws, not anyone's details.
"""

import calendar
import copy
import datetime
import itertools
import json
import random
import re
import string
from pathlib import Path

from ftengine.checkpoint import atomic_write_text

KEYS = ("name", "age", "city", "email", "phone", "date")
USER_PREFIX = "Extract the contact record as JSON.\n\n"


def _pool(text):
    """A tuple of the comma-separated entries of ``text`` (entries may hold spaces)."""
    return tuple(entry.strip() for entry in text.replace("\n", ",").split(",") if entry.strip())


TITLES_BY_GENDER = {
    "female": ("Dr.", "Prof.", "Ms.", "Mrs.", "Dr", "Ms", "Mx."),
    "male": ("Dr.", "Prof.", "Mr.", "Dr", "Mr", "Mx."),
}
TITLES = ("Dr.", "Prof.", "Ms.", "Mrs.", "Mr.", "Mx.", "Dr", "Prof", "Ms", "Mrs", "Mr")
SUFFIXES = ("Jr.", "Sr.", "II", "III")

# Given names of many origins, spelled in ASCII (the target JSON would escape anything else).
FEMALE_FIRST_NAMES = _pool(
    """
    Jane, Emily, Olivia, Hannah, Grace, Chloe, Rachel, Zoe, Sarah, Lucy, Claire, Abigail, Megan, Heather,
    Courtney, Lauren, Gwendolyn, Harriet, Mildred, Imogen, Beatrix, Rosalind, Winifred, Tamsin, Delilah,
    Marjorie, Mary Ann, Tamika, Renee, Keisha, Shanice, LaToya, Imani, Aaliyah, Ebony, Jazmine, Nia, DeAndra,
    Maria, Sofia, Camila, Ana, Lucia, Valentina, Ximena, Guadalupe, Itzel, Yesenia, Marisol, Paloma, Rocio,
    Araceli, Maria Jose, Joana, Thais, Leticia, Fernanda, Luiza, Elodie, Genevieve, Margaux, Anne-Marie,
    Marie-Claire, Solene, Maelle, Ingrid, Greta, Liesel, Anneke, Friederike, Wiebke, Sanne, Giulia, Chiara,
    Francesca, Alessandra, Graziella, Benedetta, Ivana, Katarzyna, Agnieszka, Olena, Svetlana, Zdenka,
    Malgorzata, Oksana, Bozena, Yelena, Dragana, Milena, Astrid, Sigrid, Solveig, Freja, Ingeborg, Liv,
    Annika, Eira, Eleni, Despina, Chrysoula, Kalliope, Elif, Zeynep, Ayse, Gulsen, Nesrin, Ozlem, Aisha,
    Fatima, Leila, Yasmin, Nour, Mariam, Rania, Hiba, Samira, Zainab, Amal, Shirin, Parisa, Golnaz, Roya,
    Azadeh, Tova, Shira, Yael, Noa, Ayelet, Rivka, Priya, Divya, Ananya, Lakshmi, Meenakshi, Harpreet,
    Simran, Nandini, Sunita, Kavitha, Rupinder, Aishwarya, Thenmozhi, Farzana, Nusrat, Mei, Yuki, Keiko,
    Xiaoling, Jiayi, Yu-Ting, Min-ji, Seo-yeon, Haruka, Naoko, Chiyo, Ling, Qiong, Ngoc Anh, Linh, Thuy,
    Phuong, Maricel, Jocelyn, Rosalinda, Siti, Nurul, Ayu, Malai, Kanya, Amara, Chiamaka, Ngozi, Adaeze,
    Folasade, Yetunde, Abena, Akosua, Wanjiru, Nyambura, Thandiwe, Nomvula, Zanele, Tigist, Selam, Makena,
    Fatoumata, Aminata, Siobhan, Niamh, Aoife, Caoimhe, Saoirse, Eilidh, Morag, Ffion, Bronwen, Sinead,
    Leilani, Kalena, Malia, Elena, Julia, Camille, Renata, Beatriz, Dagny, Hadley, Marguerite, Odalys
    """
)
MALE_FIRST_NAMES = _pool(
    """
    John, Daniel, Liam, Noah, Ethan, Samuel, David, Oliver, Peter, Sean, Gregory, Bartholomew, Reginald,
    Clifford, Wendell, Thaddeus, Ambrose, Jasper, Silas, Rupert, Cedric, Ezekiel, Everett, Garrett, Marcus,
    Jamal, Malik, DeShawn, Tyrone, Darnell, Jalen, Terrell, Kareem, LaMarcus, DaQuan, Carlos, Mateo,
    Diego, Alejandro, Santiago, Joaquin, Rodrigo, Guillermo, Ignacio, Esteban, Juan Pablo, Jose Luis,
    Xavier, Eduardo, Cuauhtemoc, Joao, Thiago, Goncalo, Rui, Vinicius, Etienne, Mathieu, Jean-Luc,
    Jean-Philippe, Benoit, Gaetan, Thibault, Yannick, Lukas, Jurgen, Wolfgang, Friedrich, Matthijs,
    Pieter, Sjoerd, Joost, Giuseppe, Luca, Matteo, Alessandro, Gianluca, Salvatore, Ivan, Tomas, Dmitri,
    Bogdan, Wojciech, Zbigniew, Miroslav, Vladimir, Yaroslav, Stanislav, Dragan, Nikola, Grzegorz,
    Oleksandr, Taras, Lars, Soren, Bjorn, Magnus, Anders, Eskil, Torbjorn, Henrik, Nikos, Giorgos,
    Dimitrios, Konstantinos, Stavros, Panagiotis, Emre, Mehmet, Burak, Ozgur, Cem, Kerem, Omar, Ahmed,
    Khalid, Youssef, Tariq, Hamza, Bilal, Mustafa, Faisal, Abdulrahman, Samir, Dariush, Kourosh, Arash,
    Babak, Farhad, Behrouz, Avi, Eitan, Yossi, Noam, Moshe, Raj, Arjun, Vikram, Sanjay, Rohan, Gurpreet,
    Harjit, Venkatesh, Subramanian, Aniruddha, Prakash, Siddharth, Karthik, Imran, Tanvir, Wei, Kenji,
    Hiro, Haruto, Takeshi, Ryo, Joon-ho, Min-joon, Sung-min, Zhiwei, Xiaoming, Jianguo, Bao, Hao, Minh,
    Quang, Tuan, Duc Anh, Rizal, Budi, Agus, Somchai, Anan, Arnel, Rodel, Kwame, Kofi, Chinedu, Obinna,
    Oluwaseun, Babatunde, Tunde, Emeka, Jomo, Kipchoge, Themba, Sipho, Mandla, Tesfaye, Dawit, Mamadou,
    Ousmane, Moussa, Padraig, Cillian, Oisin, Ruairi, Tadhg, Lachlan, Hamish, Dafydd, Gethin, Eoin, Kai,
    Keanu, Makoa, Felix, Andre, Victor, Hugo, Anselm, Bertrand, Casimir, Leopold, Osvaldo, Thorvald
    """
)
LAST_NAMES = _pool(
    """
    Smith, Brown, Walker, Bennett, Wright, Hughes, Baker, Doe, Thornton, Ashworth, Pemberton, Whitfield,
    Blackwood, Cartwright, Holloway, Kingsley, Worthington, Featherstone, Abernathy, Murphy, O'Brien,
    MacLeod, O'Connor, O'Sullivan, McAllister, McKenna, MacDonald, Fitzgerald, O'Shaughnessy,
    McGillicuddy, Dunleavy, Llewellyn, Pritchard, ap Rhys, Garcia, Martinez, Lopez, Reyes, Herrera,
    Gutierrez, Villanueva, de la Cruz, de los Santos, del Rio, Fernandez, Ybarra, Quintanilla, Echeverria,
    Zavala, Garcia-Lopez, Silva, Costa, da Silva, dos Santos, Pereira, Magalhaes, Carvalho, Goncalves,
    Dubois, Moreau, Lefebvre, Beaulieu, Tremblay, Gagnon, D'Amours, Lavoie, St-Pierre, Bouchard,
    Desjardins, le Roux, Thibodeaux, Schmidt, Fischer, Mueller, van der Berg, van Dijk, de Vries,
    ter Horst, von Hagen, Oosterhuis, Brandt, Hoffmann, Rossi, Esposito, D'Angelo, Di Stefano, De Luca,
    Lombardi, Bianchi, Mancuso, LaRocca, Iacobelli, Kowalski, Novak, Ivanova, Wojcik, Brzezinski,
    Szczepanski, Petrov, Horvat, Dvorak, Kovalenko, Shevchenko, Nowakowska, Popescu, Dragomir, Vukovic,
    Jovanovic, Johansson, Lindqvist, Larsen, Haugen, Bjornstad, Nieminen, Virtanen, Halvorsen,
    Sigurdsdottir, Gunnarsson, Papadopoulos, Georgiou, Karagiannis, Christodoulou, Pappas, Yilmaz, Demir,
    Ozturk, Kaya, Celik, Haddad, Khoury, Al-Hassan, El-Amin, Abdullah, Nasser, Al-Farsi, Mansour, Saleh,
    Abu-Ghazaleh, Tehrani, Hosseini, Farahani, Karimi, Rahimi, Cohen, Levy, Friedman, Goldberg, Ben-David,
    Katz, Rosenblatt, Patel, Singh, Khan, Sharma, Iyer, Reddy, Chatterjee, Subramaniam, Venkataraman, Gill,
    Dhillon, Chaudhry, Mukherjee, Balasubramanian, Rahman, Hossain, Siddiqui, Fernando, Wickramasinghe,
    Jayawardena, Chen, Nguyen, Kim, Park, Tanaka, Yamamoto, Li, Wang, Zhang, Liu, Huang, Takahashi,
    Watanabe, Nakamura, Choi, Jeong, Kang, Ouyang, Sato, Hashimoto, Leung, Ng, Chau, Tsai, Lin, Tran, Pham,
    Le, Vo, Huynh, Dang, Bui, Santos, dela Cruz, Macapagal, Sutanto, Wijaya, Chaiyaporn, Sok, Okafor,
    Mensah, Adeyemi, Okonkwo, Nwosu, Asante, Boateng, Owusu, Kamau, Otieno, Mwangi, Ndlovu, Dlamini,
    Nkosi, Haile, Diallo, Traore, N'Diaye, Balogun, Oyelaran, Kahananui, Kealoha, Tuilagi, Fonoti, Taufa,
    Smith-Jones, Harper-Nguyen, Okafor-Reid, Yamamoto-Lee, Ruiz-Tagle, Lindqvist-Moreau, MacIntyre,
    Van Buren, DiMaggio, LeBlanc, DeLuca, St. Clair, Ferreira, Ivanov, Sorensen, Novotny, Takeda
    """
)
# Syllables for names nobody has: copying them letter by letter is the only way to get them right.
ONSETS = ("",) * 4 + _pool("b, br, ch, d, dr, f, g, gr, h, j, k, kh, l, m, n, p, r, s, sh, st, t, th, tr, v, w, y, z, zh")
VOWELS = _pool("a, e, i, o, u, a, e, i, o, a, ai, ia, ou, ei, ae, io, y")
CODAS = ("",) * 12 + _pool("n, r, l, s, k, m, th, x, nd, sh, v, t, rk, lt")
LAST_NAME_PREFIXES = ("O'", "Mc", "Mac", "van ", "de ", "Al-", "da ", "Di ", "St. ", "ben ", "El-", "Le")

CITIES = _pool(
    """
    Boston, Toronto, Austin, San Diego, Vancouver, St. Louis, Salt Lake City, New York, Chicago, Denver,
    Seattle, Portland, Atlanta, Miami, Phoenix, Minneapolis, Montreal, Calgary, Ottawa, Winnipeg, Halifax,
    Raleigh, Nashville, New Orleans, Pittsburgh, Philadelphia, Baltimore, Detroit, Cleveland, Kansas City,
    Omaha, Albuquerque, Tucson, Sacramento, Oakland, San Jose, Honolulu, Anchorage, Boise, Spokane,
    Madison, Buffalo, Providence, Richmond, Charlotte, Tampa, Dallas, Houston, El Paso, Las Vegas,
    Winston-Salem, Ann Arbor, Santa Fe, Edmonton, Quebec City, Los Angeles, San Francisco, Fresno,
    Long Beach, Bakersfield, Santa Barbara, Reno, Tacoma, Bellevue, Colorado Springs, Fort Collins,
    Cheyenne, Billings, Bozeman, Fargo, Sioux Falls, Des Moines, Cedar Rapids, Milwaukee, Green Bay,
    Indianapolis, Fort Wayne, Columbus, Cincinnati, Toledo, Louisville, Lexington, Memphis, Knoxville,
    Chattanooga, Birmingham, Huntsville, Little Rock, Tulsa, Oklahoma City, Wichita, San Antonio,
    Fort Worth, Corpus Christi, Lubbock, Baton Rouge, Shreveport, Jacksonville, Tallahassee,
    Fort Lauderdale, Charleston, Greenville, Durham, Asheville, Norfolk, Hartford, New Haven, Stamford,
    Burlington, Worcester, Albany, Syracuse, Rochester, Newark, Jersey City, Scranton, Wilkes-Barre,
    Allentown, Harrisburg, Wilmington, Coeur d'Alene, St. Paul, Duluth, Grand Rapids, Kalamazoo, Lansing,
    Dayton, Akron, Santa Cruz, San Luis Obispo, Palm Springs, Flagstaff, Juneau, Hilo, Rapid City,
    Bismarck, Missoula, Laramie, Provo, Ogden, Carson City, Las Cruces, Amarillo, Port St. Lucie,
    St. Petersburg, Gainesville, Pensacola, Saskatoon, Regina, Victoria, Kitchener, Waterloo,
    Mississauga, Brampton, Burnaby, Kelowna, Kamloops, Nanaimo, Thunder Bay, Sudbury, Sault Ste. Marie,
    Trois-Rivieres, Sherbrooke, Gatineau, Laval, Moncton, Fredericton, St. John's, Charlottetown,
    Whitehorse, Yellowknife, Iqaluit, Red Deer, Lethbridge, Prince George, Guelph, Oshawa, Niagara Falls,
    Mexico City, Guadalajara, Monterrey, Tijuana, Puebla, Merida, Oaxaca, Cancun, Queretaro,
    San Miguel de Allende, Ciudad Juarez, Hermosillo, Ensenada, Modesto, Stockton, Anaheim, Irvine,
    Chula Vista, Scottsdale, Tempe, Plano, Waco, Galveston, Boulder, Santa Rosa, Eau Claire, La Crosse,
    Peoria, Rockford, Topeka, Macon, Biloxi, Terre Haute, South Bend, Flint, Traverse City, Bangor, Ithaca,
    Poughkeepsie, Schenectady, Roanoke, Medicine Hat, Grande Prairie, Val-d'Or, Rouyn-Noranda, Timmins,
    Peterborough, Chilliwack, Abbotsford, Penticton, Morelia, Mazatlan, Veracruz, Saltillo
    """
) + _pool(
    # Long, multi-word and hard-to-spell places: copied letter by letter or not at all.
    """
    Tuscaloosa, Punxsutawney, Ypsilanti, Walla Walla, Wapakoneta, Okeechobee, Natchitoches, Hackensack,
    Weehawken, Cheektowaga, Tonawanda, Skaneateles, Canandaigua, Mishawaka, Oconomowoc, Kenosha, Sheboygan,
    Winnemucca, Tehachapi, Rancho Cucamonga, Rancho Palos Verdes, Lake Havasu City, Bullhead City,
    Hot Springs, Eureka Springs, Myrtle Beach, Hilton Head Island, Kill Devil Hills, Pocatello, Idaho Falls,
    Twin Falls, Sioux City, Council Bluffs, Cedar Falls, Grand Junction, Glenwood Springs, Steamboat Springs,
    Pagosa Springs, Truth or Consequences, Los Alamos, Rio Rancho, Virginia Beach, Newport News,
    Fredericksburg, Harpers Ferry, Morgantown, Parkersburg, Chillicothe, Ashtabula, Sandusky, Youngstown,
    Altoona, Hagerstown, Annapolis, Saratoga Springs, Plattsburgh, Binghamton, Montpelier, St. Johnsbury,
    New Bedford, Fall River, Pawtucket, Woonsocket, Waterbury, Bridgeport, Bar Harbor, Presque Isle,
    Spartanburg, Valdosta, Kissimmee, Apalachicola, Boca Raton, West Palm Beach, Daytona Beach, Cape Coral,
    Muscle Shoals, Opelousas, Thibodaux, Hattiesburg, Texarkana, Nacogdoches, Brownsville, Harlingen,
    San Angelo, Wichita Falls, Round Rock, New Braunfels, Broken Arrow, Bartlesville, Dodge City,
    Grand Island, North Platte, Scottsbluff, Spearfish, Grand Forks, Bemidji, International Falls, Mankato,
    Oshkosh, Wausau, Escanaba, Battle Creek, Muskegon, Petoskey, Valparaiso, Kokomo, Muncie, Champaign,
    Carbondale, Cape Girardeau, Poplar Bluff, Paducah, Bowling Green, Owensboro, Murfreesboro, Clarksville,
    Johnson City, Kingsport, Gatlinburg, Pigeon Forge, Rocky Mount, Kitty Hawk, Coos Bay, Klamath Falls,
    Grants Pass, Port Angeles, Wenatchee, Yakima, Puyallup, Sedro-Woolley, Anacortes, Port Townsend,
    Ketchikan, Fairbanks, Kodiak, Wasilla, Kailua-Kona, Lahaina, Pahrump, Prescott Valley, Sierra Vista,
    Cedar City, Rock Springs, Great Falls, Kalispell, Saint-Jean-sur-Richelieu, Riviere-du-Loup,
    Salaberry-de-Valleyfield, Mont-Tremblant, Baie-Comeau, Drummondville, Saint-Hyacinthe, Shawinigan,
    Chicoutimi, Rimouski, Dollard-des-Ormeaux, Pointe-Claire, Repentigny, Terrebonne, Lac-Megantic,
    Chibougamau, Kapuskasing, Kirkland Lake, Elliot Lake, North Bay, Owen Sound, Smiths Falls, Orillia,
    Collingwood, Moose Jaw, Swift Current, Prince Albert, North Battleford, Flin Flon, Portage la Prairie,
    Steinbach, Fort McMurray, Lloydminster, Canmore, Revelstoke, Salmon Arm, Dawson Creek, Fort St. John,
    Prince Rupert, Campbell River, Port Alberni, Tofino, Squamish, Coquitlam, Port Coquitlam, Maple Ridge,
    Corner Brook, Grand Falls-Windsor, Happy Valley-Goose Bay, Antigonish, Miramichi, Edmundston, Inuvik,
    Hay River, Rankin Inlet, Dawson City, Ciudad Obregon, San Luis Potosi, Aguascalientes,
    San Cristobal de las Casas, Playa del Carmen, Puerto Vallarta, Puerto Escondido, Zihuatanejo, Cuernavaca,
    Pachuca, Tlaxcala, Zacatecas, Culiacan, Los Mochis, Cabo San Lucas, Nuevo Laredo, Reynosa, Matamoros,
    Tampico, Xalapa, Coatzacoalcos, Villahermosa, Chetumal, Irapuato, Celaya, Guanajuato, Tlaquepaque,
    Zapopan, Torreon, Uruapan
    """
)
# Reserved for documentation and testing (RFC 2606, RFC 6761): no real mailbox.
EMAIL_DOMAINS = ("example.com", "example.org", "example.net", "mail.example.com", "mail.example.org", "corp.example.net")
DOMAIN_WORDS = _pool(
    """
    acme, northwind, bluefern, lakeside, summit, harbor, maple, cedar, pinecrest, brightpath, redwood,
    oakridge, silverline, greenleaf, ironwood, clearwater, stonebridge, sunrise, riverbend, fastmail,
    postbox, inbox, company, school, clinic, studio, lab, coop, agency, bakery, law, dental, realty, mail
    """
)
EMAIL_TAGS = ("news", "work", "shop", "jobs", "rent", "list", "promo", "apps", "home", "x")
# Words people glue to a made-up handle: ``trellrunner26``, ``quietfox``.
HANDLE_WORDS = _pool(
    """
    runner, fox, bird, maker, wolf, rider, moon, pixel, otter, hawk, reader, baker, sailor, pine, river, storm,
    dust, cloud, bear, crow, lark, spark, frost, jazz, quiet, swift, blue, lucky, wild, ember, finch, moss
    """
)

# How often each field is stated; the rest of the time it is null.
FIELD_RATES = {"name": 0.93, "age": 0.52, "city": 0.68, "email": 0.66, "phone": 0.72, "date": 0.55}
TITLE_RATE = 0.18
MADE_UP_NAME_RATE = 0.32  # of first names and of last names, each
FIRST_NAME_ONLY_RATE = 0.04
UPPERCASE_EMAIL_RATE = 0.35
SINGLE_DIGIT_DAY_RATE = 0.3  # on top of days 1-9 drawn at random: "Aug. 1", "4/2/2024" must still be padded
SCENE_RATE = 0.3  # messages about one person among others: staff, a forwarder, an author, attendees
DOCUMENT_RATE = 0.3  # spreadsheet rows, business cards, invoices, waybills, threads, ads, intake notes ...
APPOSITION_RATE = 0.4  # an age right after the name: "Kang Ji-woo, 41, ...", "Torbjorn (46) ..."
ASIDE_RATE = 0.35
MAX_ANSWER_CHARS = 150  # measured at most 74 tokens: the default job generates 80
MAX_ROUGH_TOKENS = 200  # of a message and its answer (``_rough_tokens``): a row within the default job's 256 tokens

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
# Words a made-up name must not be: it would read as a month, a weekday, a title, a city.
_RESERVED_WORDS = {
    word.lower() for word in (*calendar.month_name[1:], *calendar.month_abbr[1:], *calendar.day_name, *calendar.day_abbr, *TITLES)
} | {word.lower() for city in CITIES for word in re.findall(r"[A-Za-z']+", city)}


def _made_up_name(rng, syllables, longest=9):
    while True:
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
        if 3 <= len(word) <= longest and word not in _RESERVED_WORDS:
            return word.capitalize()


def _first_name(rng, gender):
    if rng.random() < MADE_UP_NAME_RATE:
        return _made_up_name(rng, rng.choice((2, 2, 3)))
    return rng.choice(FEMALE_FIRST_NAMES if gender == "female" else MALE_FIRST_NAMES)


def _last_name(rng):
    r = rng.random()
    if r < MADE_UP_NAME_RATE * 0.7:
        return _made_up_name(rng, rng.choice((2, 2, 3)))
    if r < MADE_UP_NAME_RATE:
        prefix = rng.choice(LAST_NAME_PREFIXES)
        return prefix + _made_up_name(rng, rng.choice((2, 2, 3)))
    if r < MADE_UP_NAME_RATE + 0.07:
        # A double-barrelled name out of two others.
        first, second = rng.choice(LAST_NAMES), rng.choice((*LAST_NAMES, _made_up_name(rng, 2)))
        if len(first + second) <= 14 and " " not in first + second and "-" not in first + second and first != second:
            return f"{first}-{second}"
    return rng.choice(LAST_NAMES)


def _name_words(name):
    return {word.lower() for word in re.split(r"[\s\-']+", name) if len(word) > 1}


def _ordinal(day):
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _month_abbreviation(rng, month):
    """Jan, Jan. or (for September) Sept./Sep; May, June and July may stay whole."""
    abbr = calendar.month_abbr[month]
    if month == 9 and rng.random() < 0.5:
        abbr = "Sept"
    if abbr == calendar.month_name[month]:
        return abbr
    return abbr + "." if rng.random() < 0.4 else abbr


def _spell_date(rng, date):
    month, mon = calendar.month_name[date.month], _month_abbreviation(rng, date.month)
    if rng.random() < 0.1:
        month, mon = month.lower(), mon.lower()
    d, m, y = date.day, date.month, date.year
    spelled = rng.choice(
        (
            f"{month} {d}, {y}",
            f"{mon} {d}, {y}",
            f"{month} {_ordinal(d)}, {y}",
            f"{mon} {_ordinal(d)}, {y}",
            f"{month} {d} {y}",
            f"{d} {mon} {y}",
            f"{d} {month} {y}",
            f"{_ordinal(d)} {month} {y}",
            f"{d}-{mon.rstrip('.')}-{y}",
            f"{m:02d}/{d:02d}/{y}",
            f"{m}/{d}/{y}",
            f"{m}/{d}/{y}",
            f"{m:02d}-{d:02d}-{y}",
            date.isoformat(),
            f"the {_ordinal(d)} of {month} {y}",
            f"the {_ordinal(d)} of {month}, {y}",
            f"{d:02d}-{calendar.month_abbr[m].upper()}-{y}",
            f"{m:02d}.{d:02d}.{y}",
            f"{m}.{d}.{y}",
            f"{y}/{m:02d}/{d:02d}",
            f"{mon} {_ordinal(d)} {y}",
        )
    )
    if rng.random() < 0.15 and not spelled.startswith("the "):
        weekday = rng.choice((calendar.day_name, calendar.day_abbr))[date.weekday()]
        if weekday in calendar.day_abbr and rng.random() < 0.4:
            weekday += "."
        spelled = f"{weekday}{rng.choice((', ', ' '))}{spelled}"
    return spelled


def _nxx(rng):
    """An area code or exchange of the North American plan: 2-9 then two digits, not N11."""
    while True:
        digits = f"{rng.randrange(2, 10)}{rng.randrange(100):02d}"
        if digits[1:] != "11":
            return digits


def _draw_phone(rng):
    return _nxx(rng), _nxx(rng), f"{rng.randrange(10000):04d}"


def _spell_phone(rng, area, exchange, line):
    a, x, n = area, exchange, line
    return rng.choice(
        (
            f"({a}) {x}-{n}",
            f"({a}) {x}-{n}",
            f"{a}-{x}-{n}",
            f"{a}-{x}-{n}",
            f"{a}.{x}.{n}",
            f"+1 {a} {x} {n}",
            f"{a}{x}{n}",
            f"+1-{a}-{x}-{n}",
            f"1-{a}-{x}-{n}",
            f"{a} {x} {n}",
            f"+1 ({a}) {x}-{n}",
            f"+1{a}{x}{n}",
            f"1 ({a}) {x}-{n}",
            f"({a}){x}-{n}",
            f"{a}/{x}-{n}",
            f"1.{a}.{x}.{n}",
            f"+1.{a}.{x}.{n}",
            f"{a} {x}-{n}",
            f"{a}-{x}{n}",
        )
    )


def _email_domain(rng):
    r = rng.random()
    if r < 0.45:
        return rng.choice(EMAIL_DOMAINS)
    word = rng.choice(DOMAIN_WORDS)
    if r < 0.8:
        return f"{word}.example"
    if r < 0.85:
        return f"{word}-{rng.choice(DOMAIN_WORDS)}.example"
    if r < 0.92:
        return f"{rng.choice(('mail', 'eng', 'us', 'east', 'staff', 'students'))}.{word}.example"
    return f"{word}.test"


def _email_address(rng, first, middle, last, handle_only=False):
    """An address as typed (the record holds it lowercased); ``handle_only``: a made-up handle
    that reads like words (``quietfox26``), nothing from the name."""

    def clean(part):
        return "".join(c for c in part if c.isalnum())

    # Of two surnames (``Reyes Villanueva``), addresses mostly use the first: no 40-letter handle.
    words = (last or "").split()
    if len(clean(last or "")) > 12 and sum(word[0].isupper() for word in words) >= 2:
        last = " ".join(words[:-1])
    first, last = clean(first), clean(last or _made_up_name(rng, 2))
    fi, li, mi = first[0], last[0], clean(middle)[:1]
    n = rng.choice((rng.randrange(1, 10), rng.randrange(10, 100), rng.randrange(10, 100), rng.randrange(100, 10000)))
    handle = _made_up_name(rng, rng.choice((1, 2, 2))).lower()
    word = rng.choice(HANDLE_WORDS)
    if rng.random() < 0.3:
        handle, word = handle.capitalize(), word.capitalize()  # typed CamelCase: TrellRunner26
    handles = (
        f"{handle}{word}{n}",
        f"{handle}{word}",
        f"{word}{handle}{n}",
        f"{word}.{handle}",
        f"{handle}_{word}{rng.randrange(10, 100)}",
        f"{word}{rng.choice(HANDLE_WORDS)}{n}",
        f"the{word}{handle}",
    )
    local = (
        rng.choice(handles)
        if handle_only
        else rng.choice(
            (
                f"{first}.{last}",
                f"{first}.{last}",
                f"{first}.{clean(middle) or handle}.{last}",
                f"{first}.{last}.{rng.choice(('accounting', 'admissions', 'frontdesk', 'research', 'volunteers'))}",
                f"{first}_{last}_{n}",
                f"{fi}{last}",
                f"{first}{li}",
                f"{first}_{last}",
                f"{last}.{first}",
                f"{first}{n}",
                f"{first}.{last}{n}",
                f"{first}-{last}",
                f"{fi}.{last}",
                f"{first}{last}",
                f"{last}_{fi}{n}",
                f"{first}.{last}+{rng.choice(EMAIL_TAGS)}",
                f"{first}+{rng.choice(EMAIL_TAGS)}",
                f"{handle}{n}",
                f"{handle}.{rng.choice(DOMAIN_WORDS)}",
                f"{handle}_{n}",
                f"{handle}{word}{n}",
                f"{handle}{word}",
                f"{word}{handle}{n}",
                f"{word}.{handle}",
                f"{handle}_{word}{rng.randrange(10, 100)}",
                f"{fi}{mi}{li}{n}" if mi else f"{fi}{li}{n}",
                f"{first}.{mi}.{last}" if mi else f"{first}.{last}.{n}",
            )
        )
    )
    typed = f"{local}@{_email_domain(rng)}"
    if rng.random() >= UPPERCASE_EMAIL_RATE:
        return typed if any(c.isupper() for c in local) and rng.random() < 0.2 else typed.lower()
    return _with_uppercase(rng, typed)


def _with_uppercase(rng, email):
    """How people sometimes type an address: the name's own capitals, capitalised parts, all caps."""
    local, domain = email.split("@")
    style = rng.choice(("as_named", "as_named", "title", "local", "upper", "upper", "upper_local"))
    if style == "as_named":
        return email if any(c.isupper() for c in local) else f"{local.capitalize()}@{domain.lower()}"
    if style == "upper":
        return email.upper()
    if style == "upper_local":
        return f"{local.upper()}@{domain.lower()}"
    capitalised_local = ".".join(part.capitalize() for part in local.lower().split("."))
    if style == "local":
        return f"{capitalised_local}@{domain.lower()}"
    return f"{capitalised_local}@{domain.lower().capitalize()}"


def _draw_name(rng, gender):
    """``(first, middle, last, full name)``; ``last`` is empty for a first name alone."""
    first = _first_name(rng, gender)
    if rng.random() < FIRST_NAME_ONLY_RATE:
        return first, "", "", first
    last = _last_name(rng)
    r = rng.random()
    if r < 0.1:
        middle = f"{rng.choice(string.ascii_uppercase)}."
    elif r < 0.14:
        middle = _first_name(rng, gender)
    else:
        middle = ""
    if rng.random() < 0.05:
        # Two surnames, or a long made-up one: more letters to copy.
        second = rng.choice((rng.choice(LAST_NAMES), _made_up_name(rng, 4, longest=12)))
        if _name_words(second).isdisjoint(_name_words(last)):
            last = f"{last} {second}"
    suffix = f" {rng.choice(SUFFIXES)}" if rng.random() < 0.04 else ""
    return first, middle, last, " ".join(filter(None, (first, middle, last))) + suffix


def _someone(rng, person, prefix):
    """Someone else, sharing no name word, phone number or e-mail address with the contact or
    with anyone already in the message; their details become placeholders ``{<prefix>name}``,
    ``{<prefix>first}``, ``{<prefix>last}``, ``{<prefix>phone}``, ``{<prefix>email}`` and
    ``{<prefix>title}`` (Dr., Ms., ...) in ``person``, tracked as other people's once shown."""
    taken = person["taken"]
    while True:
        gender = rng.choice(("female", "male"))
        first, _, last, _ = _draw_name(rng, gender)
        last = last or rng.choice(LAST_NAMES)
        if _name_words(f"{first} {last}").isdisjoint(taken["words"]):
            break
    while True:
        area, exchange, line = _draw_phone(rng)
        if f"+1{area}{exchange}{line}" not in taken["phones"]:
            break
    while True:
        email = _email_address(rng, first, "", last)
        if email.lower() not in taken["emails"]:
            break
    name, e164 = f"{first} {last}", f"+1{area}{exchange}{line}"
    taken["words"] |= _name_words(name)
    taken["phones"].add(e164)
    taken["emails"].add(email.lower())
    values = {"name": name, "first": first, "last": last, "phone": _spell_phone(rng, area, exchange, line), "email": email}
    person.update({prefix + key: value for key, value in values.items()})
    person[prefix + "gender"] = gender
    person[prefix + "title"] = rng.choice(TITLES_BY_GENDER[gender][:-1])
    person["track"].update(
        {
            prefix + "name": ("names", name),
            prefix + "first": ("names", first),
            prefix + "last": ("names", last),
            prefix + "phone": ("phones", e164),
            prefix + "email": ("emails", email.lower()),
        }
    )
    return person


def _draw_person(rng):
    """A record plus the spellings its fields take in the message.

    Returns ``(record, written, person)``: ``written`` maps a field to its text in the message,
    ``person`` holds what the templates use besides: the first name, pronouns, and someone
    else's details (``oname``, ``ofirst``, ``olast``, ``ophone``, ``oemail``) for noise; a
    scene draws more people with ``_someone``. ``person["shown"]`` collects the other people's
    names, phones (E.164) and e-mails (lowercased) that the message shows.
    """
    while True:
        present = {key: rng.random() < rate for key, rate in FIELD_RATES.items()}
        # A name alone is not a contact record worth extracting.
        if any(present[key] for key in KEYS[1:]):
            break
    gender = rng.choice(("female", "male"))
    first, middle, last, name = _draw_name(rng, gender)
    age = rng.randrange(18, 95)
    city = rng.choice(CITIES)
    typed_email = _email_address(rng, first, middle, last, handle_only=not present["name"] and rng.random() < NO_NAME_HANDLE_RATE)
    area, exchange, line = _draw_phone(rng)
    date = datetime.date(rng.randrange(2020, 2031), rng.randrange(1, 13), 1)
    last_day = 9 if rng.random() < SINGLE_DIGIT_DAY_RATE else calendar.monthrange(date.year, date.month)[1]
    date = date.replace(day=rng.randrange(1, last_day + 1))

    written = {}
    if present["name"]:
        title = rng.choice(TITLES_BY_GENDER[gender])
        written["name"] = f"{title} {name}" if last and rng.random() < TITLE_RATE else name
    if present["age"]:
        written["age"] = _age_in_words(rng, age) if rng.random() < AGE_IN_WORDS_RATE else str(age)
    if present["city"]:
        written["city"] = city
    if present["email"]:
        written["email"] = typed_email
    if present["phone"]:
        written["phone"] = _spell_phone(rng, area, exchange, line)
        if rng.random() < EXTENSION_RATE:
            written["phone"] += rng.choice((" ext. ", " ext ", " x", ", ext. ")) + str(rng.randrange(2, 1000))
    if present["date"]:
        written["date"] = _spell_date(rng, date)

    phone = f"+1{area}{exchange}{line}"
    values = {"name": name, "age": age, "city": city, "email": typed_email.lower(), "phone": phone, "date": date.isoformat()}
    record = {key: values[key] if present[key] else None for key in KEYS}
    person = {
        "first": first,
        "gender": gender,
        **PRONOUNS[gender],
        "taken": {"words": _name_words(name), "phones": {phone}, "emails": {typed_email.lower()}},
        "track": {},
        "shown": {"names": [], "phones": [], "emails": []},
    }
    return record, written, _someone(rng, person, "o")


# --------------------------------------------------------------------------------------------
# Message templates. Placeholders: {name} {age} {city} {email} {phone} {date} (as written),
# {first}, the pronouns {subj} {obj} {poss}, and someone else's {oname} {ofirst} {olast}
# {ophone}.
# --------------------------------------------------------------------------------------------

FIRST_PERSON = {
    "age": (
        "I'm {age}",
        "I am {age} years old",
        "I'm {age} years old",
        "age {age}",
        "I just turned {age}",
        "I'm a {age}-year-old",
        "my age is {age}",
        "I'm {age} y/o",
    ),
    "city": (
        "I live in {city}",
        "I'm based in {city}",
        "I'm in {city}",
        "I just moved to {city}",
        "I'm from {city}",
        "I'm located in {city}",
        "home is {city}",
        "I'm over in {city}",
        "currently living in {city}",
    ),
    "email": (
        "my email is {email}",
        "you can email me at {email}",
        "reach me at {email}",
        "email: {email}",
        "drop me a line at {email}",
        "my e-mail is {email}",
        "write to me at {email}",
        "best email is {email}",
        "{email} is my email",
    ),
    "phone": (
        "my number is {phone}",
        "call me at {phone}",
        "my cell is {phone}",
        "phone: {phone}",
        "text me on {phone}",
        "you can reach me on {phone}",
        "my mobile is {phone}",
        "give me a call at {phone}",
        "best number is {phone}",
        "{phone} is my cell",
        "text or call {phone}",
    ),
    "date": (
        "I'd like to meet on {date}",
        "I'm available on {date}",
        "my start date is {date}",
        "I can come in on {date}",
        "I'll be free on {date}",
        "I'd like to book {date}",
        "I'm hoping to move in on {date}",
        "my appointment is on {date}",
        "I fly in on {date}",
        "I can start {date}",
    ),
}
THIRD_PERSON = {
    "age": (
        "{subj} is {age}",
        "{subj}'s {age} years old",
        "age {age}",
        "{subj} is {age} years old",
        "{subj} just turned {age}",
        "aged {age}",
    ),
    "city": (
        "{subj} lives in {city}",
        "{subj}'s based in {city}",
        "based in {city}",
        "located in {city}",
        "{subj} is from {city}",
        "{subj} recently moved to {city}",
        "lives in {city}",
    ),
    "email": (
        "{poss} email is {email}",
        "email {email}",
        "reachable at {email}",
        "{subj} can be emailed at {email}",
        "email {obj} at {email}",
        "{poss} e-mail: {email}",
    ),
    "phone": (
        "{poss} number is {phone}",
        "cell {phone}",
        "phone {phone}",
        "call {obj} at {phone}",
        "{poss} mobile is {phone}",
        "text {obj} at {phone}",
        "{subj} can be reached at {phone}",
    ),
    "date": (
        "follow up on {date}",
        "meeting set for {date}",
        "{subj} starts on {date}",
        "callback scheduled for {date}",
        "{subj} wants to come in on {date}",
        "appointment booked for {date}",
        "{subj}'s available {date}",
    ),
}
TERSE = {
    "age": ("{age} y/o", "age {age}", "{age} yrs", "aged {age}", "{age}yo", "{age} years old", "age: {age}"),
    "city": ("lives in {city}", "from {city}", "{city} area", "based in {city}", "in {city}", "{city}-based", "out of {city}"),
    "email": ("email {email}", "{email}", "e-mail: {email}", "em: {email}", "mail {email}", "<{email}>"),
    "phone": ("cell {phone}", "{phone}", "ph {phone}", "tel. {phone}", "mob. {phone}", "c: {phone}", "phone {phone}"),
    "date": ("next meeting {date}", "follow up {date}", "met on {date}", "call back {date}", "appt {date}", "f/u {date}"),
}
LABELS = {
    "name": ("Name", "Full name", "Contact", "Customer", "Client", "Applicant", "Guest"),
    "age": ("Age", "Age (yrs)"),
    "city": ("City", "Location", "Town", "Home city"),
    "email": ("Email", "E-mail", "Email address", "Mail"),
    "phone": ("Phone", "Tel", "Mobile", "Phone number", "Cell", "Contact no."),
    "date": ("Date", "Follow-up", "Appointment", "Start date", "Preferred date", "Move-in", "Visit date"),
}
BLANKS = ("n/a", "-", "", "none", "(blank)", "N/A", "?", "not given", "TBD", "--")

# Noise: clauses that carry no field of the record. Someone else's name or number is always
# framed as someone else's.
OTHERS = {
    "first": (
        "my manager, {oname}, is cc'd",
        "I was referred by {oname}",
        "{oname} from accounting says hi",
        "if I'm out, try the front desk at {ophone}",
        "my manager {oname} is at {ophone} if it's urgent",
        "you can also ask for {oname} at reception, {ophone}",
        "my emergency contact is {oname}, {ophone}",
        "my roommate {ofirst} might pick up",
        "my doctor, Dr. {olast}, referred me",
        "{oname} gave me your number",
        "the number I called from, {ophone}, is my office's front desk",
        "please cc my assistant {oname} at {oemail}",
        "my colleague {oname} ({oemail}) is handling the paperwork",
    ),
    "third": (
        "referred by {oname}",
        "{poss} manager is {oname}",
        "assistant: {oname}, {ophone}",
        "front desk {ophone}, not {poss} line",
        "emergency contact {oname} ({ophone})",
        "spoke with {poss} colleague {oname} first",
        "the hotel front desk is {ophone}",
        "{ofirst} took the message",
        "{ophone} is {poss} landlord's number",
        "cc {poss} assistant {oname}, {oemail}",
        "{poss} agent {oname} ({oemail}) set this up",
    ),
}
NO_NAME_OTHERS = {
    "first": ("if I'm out, try the front desk at {ophone}", "the main office line is {ophone}, not mine"),
    "third": ("front desk {ophone}, not {poss} line", "the hotel front desk is {ophone}"),
}
SMALL_TALK = {
    "first": (
        "I'm interested in the apartment on Elm Street",
        "I saw your post about the weekend workshop",
        "following up on our call last week",
        "I'd love to join the volunteer program",
        "sorry for the late reply",
        "no rush on this",
        "hope the move went well",
        "sorry for the typos, sent from my phone",
        "I have a small dog, hope that's ok",
        "happy to bring references",
        "mornings work best for me",
        "I'll bring the paperwork",
    ),
    "third": (
        "interested in the premium plan",
        "prefers email over calls",
        "warm lead from the webinar",
        "asked about parking",
        "very friendly",
        "wants a quote for the kitchen remodel",
        "came in through the website",
        "needs wheelchair access",
        "has a small dog",
        "left a nice review",
    ),
}
NUMBER_NOISE = {
    "first": (
        "re: order #{order}",
        "my order number is {order}",
        "I'm in room {room}",
        "the quote was {price}",
        "about ticket {ticket}",
        "my budget is around {price}",
        "confirmation code {code}",
        "I'm in unit {room}",
    ),
    "third": (
        "order #{order}",
        "ticket {ticket}",
        "quoted {price}",
        "room {room}",
        "invoice INV-{order} paid",
        "conf. code {code}",
        "budget {price}",
        "unit {room}",
    ),
}


NOISE_LINES = (
    ("Referred by", "{oname}"),
    ("Emergency contact", "{oname}, {ophone}"),
    ("Front desk", "{ophone}"),
    ("Order", "#{order}"),
    ("Ticket", "{ticket}"),
    ("Room", "{room}"),
    ("Budget", "{price}"),
    ("Notes", "{talk}"),
)


def _noise_numbers(rng):
    price = rng.choice(
        (
            f"${rng.randrange(100, 1000)}",
            f"${rng.randrange(1, 10)},{rng.randrange(1000):03d}",
            f"${rng.randrange(100, 500)}.{rng.randrange(100):02d}",
        )
    )
    return {
        "order": str(rng.randrange(10000, 1000000)),
        "room": str(rng.randrange(100, 1000)),
        "price": price,
        "ticket": f"{rng.choice(('TK', 'INC', 'CS', 'SR'))}-{rng.randrange(10000, 100000)}",
        "code": "".join(rng.choice(string.ascii_uppercase + "23456789") for _ in range(6)),
    }


def _fill(template, written, person):
    # Remember which of other people's details a message shows.
    for _, field, _, _ in string.Formatter().parse(template):
        if field in person["track"]:
            kind, value = person["track"][field]
            if value not in person["shown"][kind]:
                person["shown"][kind].append(value)
    return template.format(**written, **person)


def _capitalise(text):
    return text[0].upper() + text[1:] if text else text


def _sentence_case(template, written, person):
    text = _fill(template, written, person)
    # A value keeps its case (an email written in lowercase); a pronoun or a word does not.
    if template.startswith("{") and not template.startswith(("{subj}", "{poss}")):
        return text
    return _capitalise(text)


def _clauses(rng, templates, fields, written, person, capitalise):
    fill = _sentence_case if capitalise else _fill
    return [fill(rng.choice(templates[field]), written, person) for field in fields]


def _aside(rng, written, person, voice, rate=ASIDE_RATE):
    """A clause that carries no field (no trailing period), or ``""``: small talk, an order
    or room number, a price, or someone else's name or number."""
    if rng.random() >= rate:
        return ""
    kind = rng.choice(("talk", "numbers", "other", "other"))
    if kind == "talk":
        return rng.choice(SMALL_TALK[voice])
    if kind == "numbers":
        return rng.choice(NUMBER_NOISE[voice]).format(**_noise_numbers(rng))
    others = OTHERS if "name" in written else NO_NAME_OTHERS
    return _fill(rng.choice(others[voice]), written, person)


def _as_sentence(clause):
    return _capitalise(clause) + "." if clause else ""


def _shuffled_details(rng, written):
    fields = [key for key in KEYS[1:] if key in written]
    rng.shuffle(fields)
    return fields


def _with_age(rng, written, fields, trailing):
    """``written`` with, sometimes, the age in apposition to the name (``Kang Ji-woo, 41,``
    when more words follow in the sentence, else ``Torbjorn (46)``); the age then leaves
    ``fields``."""
    if "name" not in written or "age" not in fields or rng.random() >= APPOSITION_RATE:
        return written
    fields.remove("age")
    name, age = written["name"], written["age"]
    return {**written, "name": f"{name}, {age}," if trailing and rng.random() < 0.6 else f"{name} ({age})"}


def _insert(rng, items, item):
    """``items`` with ``item`` at a random place (nothing added when ``item`` is empty)."""
    if item:
        items.insert(rng.randrange(len(items) + 1), item)
    return items


def _email_message(rng, written, person):
    fields = _shuffled_details(rng, written)
    greeting = rng.choice(("Hi,", "Hello,", "Dear team,", "Hi there,", "Good morning,", "Hey,"))
    if "name" in written and rng.random() < 0.25:
        # A referral: the sender writes about someone else.
        intro = rng.choice(
            (
                "I'd like to introduce {name}.",
                "Referring {name} to you.",
                "Please add {name} to the list.",
                "Passing along {name}'s details.",
                "My friend {name} is interested.",
            )
        )
        named = _with_age(rng, written, fields, trailing=False)
        sentences = [c + "." for c in _clauses(rng, THIRD_PERSON, fields, written, person, True)]
        _insert(rng, sentences, _as_sentence(_aside(rng, written, person, "third")))
        return f"{greeting} {_fill(intro, named, person)} {' '.join(sentences)} Thanks!"
    sentences = [c + "." for c in _clauses(rng, FIRST_PERSON, fields, written, person, True)]
    _insert(rng, sentences, _as_sentence(_aside(rng, written, person, "first")))
    name_in_signature = "name" in written and rng.random() < 0.25
    if "name" in written and not name_in_signature:
        intro = rng.choice(
            ("My name is {name}.", "This is {name}.", "I'm {name}, writing about the opening.", "{name} here.", "It's {name}.")
        )
        sentences.insert(0, _fill(intro, written, person))
    elif rng.random() < 0.5:
        sentences.insert(0, rng.choice(("I'm writing about the open position.", "I saw your listing online.")))
    sign_off = rng.choice(("Thanks,", "Best,", "Regards,", "Cheers,", "Thank you,", "Best wishes,"))
    if name_in_signature:
        signature = f"\n{written['name']}"
    else:
        signature = f" {person['first']}" if "name" in written and rng.random() < 0.5 else ""
    return f"{greeting}\n{' '.join(sentences)}\n{sign_off}{signature}"


def _note_message(rng, written, person):
    fields = _shuffled_details(rng, written)
    if "name" in written:
        opener = rng.choice(
            (
                "Met {name} today",
                "Spoke with {name}",
                "Note: {name}",
                "Lunch with {name}",
                "{name}",
                "Call from {name}",
                "Coffee w/ {name}",
                "Ran into {name}",
                "{name} stopped by",
            )
        )
        opener = _fill(opener, _with_age(rng, written, fields, trailing=False), person) + rng.choice(
            ("", "", " at the trade show", " at the school fundraiser", " after the conference", " at the coffee shop")
        )
    else:
        opener = rng.choice(("Walk-in, no name given", "Caller didn't leave a name", "Unknown caller", "Anonymous inquiry"))
    clauses = _clauses(rng, TERSE, fields, written, person, False)
    _insert(rng, clauses, _aside(rng, written, person, "third"))
    separator = rng.choice((", ", "; ", " - ", ". "))
    return opener + separator + separator.join(clauses) + rng.choice((".", "", "."))


def _chat_message(rng, written, person):
    fields = _shuffled_details(rng, written)
    if "name" in written and rng.random() < 0.2:
        intro = rng.choice(
            ("my cousin {name} is looking for a place", "fyi {name} wants in", "my friend {name} asked me to pass this on")
        )
        named = _with_age(rng, written, fields, trailing=True)
        clauses = _clauses(rng, THIRD_PERSON, fields, written, person, False)
        voice = "third"
    else:
        if "name" in written:
            intro = rng.choice(
                ("hey! it's {name} from the meetup", "hi, {name} here", "hey it's {name}", "yo, {name} again", "hello! {name}")
            )
        else:
            intro = rng.choice(("hey, new number", "hi! from the meetup", "hey", "hi again"))
        named = written
        clauses = _clauses(rng, FIRST_PERSON, fields, written, person, False)
        voice = "first"
    _insert(rng, clauses, _aside(rng, written, person, voice))
    separator = rng.choice((", ", " - ", ". ", "\n"))
    ending = rng.choice(("", "!", " :)", " thx", " lmk"))
    return _fill(intro, named, person) + separator + separator.join(clauses) + ending


def _labelled_lines(rng, written, person, header, keep_order):
    fields = list(KEYS)
    if not keep_order:
        details = fields[1:]
        rng.shuffle(details)
        fields = [fields[0], *details]
        if rng.random() < 0.3:
            rng.shuffle(fields)
    separator = rng.choice(("\n", "\n", " | ", "; "))
    colon = rng.choice((": ", ": ", ": ", " - "))
    show_blanks = rng.random() < 0.4
    lines = []
    for field in fields:
        label = rng.choice(LABELS[field])
        if field in written:
            lines.append(f"{label}{colon}{written[field]}")
        elif show_blanks:
            lines.append(f"{label}{colon}{rng.choice(BLANKS)}".rstrip())
    if rng.random() < ASIDE_RATE:
        label, value = rng.choice(NOISE_LINES)
        if "name" not in written and "{oname}" in value:
            label, value = "Front desk", "{ophone}"
        values = {**written, **_noise_numbers(rng), "talk": _capitalise(rng.choice(SMALL_TALK["third"]))}
        _insert(rng, lines, f"{label}{colon}{_fill(value, values, person)}")
    return header + separator.join(lines)


def _crm_message(rng, written, person):
    if rng.random() < 0.5:
        header = rng.choice(("CRM note - ", "Lead update: ", "Account note\n", "[CRM] ", "Contact card\n"))
        return _labelled_lines(rng, written, person, header, keep_order=False)
    fields = _shuffled_details(rng, written)
    subject = _fill("{name}", _with_age(rng, written, fields, trailing=True), person) if "name" in written else "Unnamed lead"
    lead = rng.choice(
        ("requested a demo", "asked for pricing", "renewed the contract", "called about billing", "signed up for the trial")
    )
    clauses = [c + "." for c in _clauses(rng, THIRD_PERSON, fields, written, person, True)]
    _insert(rng, clauses, _as_sentence(_aside(rng, written, person, "third")))
    return f"{rng.choice(('CRM: ', 'Lead: ', ''))}{subject} {lead}. " + " ".join(clauses)


def _form_message(rng, written, person):
    header = rng.choice(
        (
            "New sign-up\n",
            "Registration form:\n",
            "Web form submission\n",
            "Volunteer application - ",
            "Newsletter sign-up: ",
            "Booking request\n",
            "RSVP\n",
        )
    )
    return _labelled_lines(rng, written, person, header, keep_order=rng.random() < 0.6)


def _voicemail_message(rng, written, person):
    fields = _shuffled_details(rng, written)
    header = rng.choice(("Voicemail transcript: ", "[Voicemail] ", "Transcribed voicemail: ", "VM: "))
    if "name" in written:
        intro = _fill(
            rng.choice(("Hi, this is {name}", "Hello, um, it's {name}", "Hey, {name} calling", "Yes hi, {name} here")),
            written,
            person,
        )
    else:
        intro = rng.choice(("Hi, um, hello", "Hi there"))
    reason = rng.choice(
        ("", "", ", about the apartment", ", returning your call", ", about the job posting", ", regarding my appointment")
    )
    clauses = _clauses(rng, FIRST_PERSON, fields, written, person, True)
    _insert(rng, clauses, _capitalise(_aside(rng, written, person, "first")))
    return f"{header}{intro}{reason}. " + ". ".join(clauses) + rng.choice((". Thanks, bye.", ". Bye.", ". Talk soon."))


def _signature_message(rng, written, person):
    """A short email whose sender's details sit in the signature block, mostly unlabelled."""
    body = [c + "." for c in _clauses(rng, FIRST_PERSON, [f for f in ("age", "date") if f in written], written, person, True)]
    body.insert(
        0, rng.choice(("Thanks for the quick reply.", "See you then.", "Details below.", "Per our call.", "Resume attached."))
    )
    _insert(rng, body, _as_sentence(_aside(rng, written, person, "first", rate=0.4)))
    marks = {"email": ("", "", "E: ", "email: "), "phone": ("", "", "T: ", "M: ", "cell: ", "tel ")}
    details = [f for f in ("city", "email", "phone") if f in written]
    if rng.random() < 0.3:
        rng.shuffle(details)
    block = [written["name"]] if "name" in written else []
    block += [rng.choice(marks.get(f, ("",))) + written[f] for f in details]
    if len(block) > 2 and rng.random() < 0.5:
        block[1:] = [rng.choice((" | ", " / ", " - ")).join(block[1:])]
    sign_off = rng.choice(("Best,", "--", "Cheers,", "Regards,", "Thanks,"))
    return "\n".join((rng.choice(("Hi,", "Hello,", "Hi all,")), " ".join(body), sign_off, *block))


def _phone_slip_message(rng, written, person):
    """A message taken for someone else: the recipient's first name is not the contact's."""
    fields = _shuffled_details(rng, written)
    header = rng.choice(
        ("While you were out: ", "Phone message for {ofirst}: ", "Message for {ofirst} - ", "Front desk note: ", "Msg: ")
    )
    if "name" in written:
        caller = rng.choice(("{name} called", "{name} stopped by", "Caller: {name}", "{name} rang"))
    else:
        caller = rng.choice(("Someone called", "A caller (no name)"))
    clauses = _clauses(rng, TERSE, fields, written, person, False)
    _insert(rng, clauses, _aside(rng, written, person, "third", rate=0.3))
    return _fill(header, written, person) + _fill(caller, written, person) + ". " + ", ".join(clauses) + "."


def _order_message(rng, written, person):
    """An order, booking or support ticket: numbers around the contact's details."""
    numbers = _noise_numbers(rng)
    header = rng.choice(
        (
            "Order #{order} ({price})",
            "Ticket {ticket}",
            "Booking {code}",
            "Delivery for order {order}",
            "Support case {ticket}",
            "Reservation {code}, room {room}",
        )
    ).format(**numbers)
    fields = _shuffled_details(rng, written)
    if "name" in written:
        named = _with_age(rng, written, fields, trailing=False)
        subject = _fill(rng.choice(("customer {name}", "for {name}", "opened by {name}", "guest: {name}")), named, person)
    else:
        subject = rng.choice(("guest checkout", "no name on file"))
    clauses = _clauses(rng, TERSE, fields, written, person, False)
    _insert(rng, clauses, _aside(rng, written, person, "third", rate=0.3))
    separator = rng.choice((", ", "; ", " | "))
    return f"{header} - {subject}{separator}" + separator.join(clauses)


def _roster_message(rng, written, person):
    """One line of bare values, the name first or last."""
    fields = _shuffled_details(rng, written)
    name = written.get("name")
    if name and "age" in fields and rng.random() < 0.3:
        name = f"{name} ({written['age']})"
        fields.remove("age")
    ages = ("{age}", "age {age}", "{age} y/o")
    parts = [rng.choice(ages).format(**written) if f == "age" else written[f] for f in fields]
    if name:
        parts.insert(0 if rng.random() < 0.75 else len(parts), name)
    prefix = rng.choice(("", "", "Attendee: ", "RSVP: ", "Waitlist: ", "New lead -> ", "Contact: "))
    return prefix + rng.choice((", ", " | ", " / ", "; ", " - ")).join(parts)


def _bio_message(rng, written, person):
    """A few third-person sentences: a speaker bio, a new hire, a tenant."""
    fields = _shuffled_details(rng, written)
    job = rng.choice(
        ("nurse", "software developer", "teacher", "chef", "carpenter", "grad student", "paralegal", "pilot", "photographer")
    )
    header = rng.choice(("Speaker bio: ", "New hire: ", "Volunteer profile: ", "Tenant: ", "About the guest: ", ""))
    named = _with_age(rng, written, fields, trailing=True)
    subject = _fill("{name}", named, person) if "name" in written else rng.choice(("The applicant", "Our new tenant"))
    sentences = [f"{subject} is a {job}."]
    sentences += [c + "." for c in _clauses(rng, THIRD_PERSON, fields, written, person, True)]
    aside = _aside(rng, written, person, "third", rate=0.4)
    if aside:
        sentences.insert(rng.randrange(1, len(sentences) + 1), _as_sentence(aside))
    return header + " ".join(sentences)


def _forwarded_text_message(rng, written, person):
    """A text message forwarded by a colleague, whose own name is not the contact's."""
    fields = _shuffled_details(rng, written)
    if "name" in written:
        header = rng.choice(("Fwd from {ofirst}: ", "{ofirst} forwarded this: ", "Fw: text from a client - ", "> "))
        intro = rng.choice(("hi, it's {name}", "{name} here", "this is {name}"))
    else:
        # Without the contact's name, a forwarder's name could pass for the sender's.
        header = rng.choice(("Fw: text from a client - ", "> "))
        intro = rng.choice(("hi", "hello, quick one"))
    clauses = _clauses(rng, FIRST_PERSON, fields, written, person, False)
    return _fill(header, written, person) + _fill(intro, written, person) + ", " + ", ".join(clauses)


# --------------------------------------------------------------------------------------------
# Scenes: the contact among other people. A message names staff (a sales rep, a desk clerk, a
# driver ...), an author, a forwarder or attendees, with their own phones and e-mails; the
# record is about one person only, the subject (the customer, the guest, the patient ...).
# Other people get names, titles, phones and e-mails, never an age, a city or a date.
# --------------------------------------------------------------------------------------------

# subject roles, staff roles, headers, acts with the staff member first (also in the first
# person, "I"), acts with the subject first.
SCENES = (
    (
        ("customer", "client", "prospect"),
        ("sales rep", "account manager", "sales associate"),
        ("Sales log: ", "Call notes - ", "CRM activity\n"),
        (
            "{staff} logged a call with {role} {who}",
            "{staff} met {role} {who} at the showroom",
            "{staff} sent a quote to {role} {who}",
        ),
        ("{role} {who} spoke with {staff} about a quote", "{role} {who} asked {staff} for pricing"),
    ),
    (
        ("guest",),
        ("desk clerk", "night manager", "front desk agent", "concierge"),
        ("Front desk log: ", "Shift notes - ", "Night audit\n"),
        ("{staff} checked in {role} {who}", "{staff} took a booking from {role} {who}", "{staff} upgraded {role} {who}"),
        ("{role} {who} checked in with {staff}", "{role} {who} called {staff} about a late arrival"),
    ),
    (
        ("patient", "new patient"),
        ("receptionist", "nurse", "intake coordinator", "physician assistant"),
        ("Intake note: ", "Clinic desk - ", "Patient intake\n"),
        ("{staff} registered {role} {who}", "{staff} saw {role} {who} for a checkup", "{staff} triaged {role} {who}"),
        ("{role} {who} was seen by {staff}", "{role} {who} booked in with {staff}"),
    ),
    (
        ("candidate", "applicant"),
        ("recruiter", "hiring manager", "HR coordinator", "talent partner"),
        ("Recruiting note: ", "Candidate summary\n", "Interview log - "),
        (
            "{staff} screened {role} {who}",
            "{staff} interviewed {role} {who} for the analyst role",
            "{staff} is submitting {role} {who}",
        ),
        ("{role} {who} interviewed with {staff}", "{role} {who} was referred to {staff}"),
    ),
    (
        ("tenant", "new tenant", "renter"),
        ("building super", "property manager", "leasing agent"),
        ("Leasing note: ", "Building log - ", "Unit {room} turnover\n"),
        (
            "{staff} showed unit {room} to {role} {who}",
            "{staff} signed a lease with {role} {who}",
            "{staff} handed keys to {role} {who}",
        ),
        ("{role} {who} met {staff} for the walkthrough", "{role} {who} reported a leak to {staff}"),
    ),
    (
        ("recipient", "customer"),
        ("driver", "courier", "dispatcher"),
        ("Delivery report: ", "Dispatch - ", "Route note\n"),
        ("{staff} left a parcel for {role} {who}", "{staff} could not reach {role} {who}", "{staff} delivered to {role} {who}"),
        ("{role} {who} signed for a parcel from {staff}", "{role} {who} called {staff} about a missed drop"),
    ),
    (
        ("new member", "member", "trial member"),
        ("coach", "trainer", "club secretary", "membership officer"),
        ("Club notes: ", "Membership desk - ", "New member\n"),
        ("{staff} signed up {role} {who}", "{staff} gave {role} {who} a tour", "{staff} welcomed {role} {who}"),
        ("{role} {who} joined {staff}'s evening class", "{role} {who} trained with {staff}"),
    ),
    (
        ("attendee", "registrant", "speaker"),
        ("organiser", "event coordinator", "host", "volunteer lead"),
        ("Event desk: ", "RSVP log - ", "Registration note\n"),
        ("{staff} registered {role} {who}", "{staff} confirmed {role} {who} for the gala", "{staff} seated {role} {who}"),
        ("{role} {who} RSVP'd to {staff}", "{role} {who} was badged by {staff}"),
    ),
    (
        ("caller", "customer", "user"),
        ("support agent", "technician", "help desk analyst"),
        ("Ticket {ticket}: ", "Support log - ", "Case notes\n"),
        (
            "{staff} took a call from {role} {who}",
            "{staff} reset the router for {role} {who}",
            "{staff} escalated for {role} {who}",
        ),
        ("{role} {who} was helped by {staff}", "{role} {who} chatted with {staff}"),
    ),
    (
        ("policyholder", "claimant", "loan applicant", "client"),
        ("claims adjuster", "loan officer", "insurance agent", "branch manager"),
        ("Claim note: ", "Branch log - ", "File review\n"),
        ("{staff} opened a file for {role} {who}", "{staff} called {role} {who} back", "{staff} approved {role} {who}"),
        ("{role} {who} met {staff} at the branch", "{role} {who} filed a claim with {staff}"),
    ),
    (
        ("passenger", "traveller", "guest"),
        ("travel agent", "gate agent", "tour guide", "shuttle driver"),
        ("Booking note: ", "Tour roster - ", "Trip file\n"),
        ("{staff} rebooked {role} {who}", "{staff} picked up {role} {who}", "{staff} added {role} {who} to the tour"),
        ("{role} {who} booked through {staff}", "{role} {who} rode with {staff}"),
    ),
    (
        ("applicant", "new student", "student"),
        ("registrar", "admissions officer", "academic advisor"),
        ("Admissions note: ", "Registrar log - ", "Advising notes\n"),
        ("{staff} enrolled {role} {who}", "{staff} met {role} {who} about the evening program", "{staff} admitted {role} {who}"),
        ("{role} {who} met with {staff}", "{role} {who} applied through {staff}"),
    ),
)
SCENE_TAILS = ("", "", " today", " this morning", " after lunch", " on the phone", " yesterday")
# How the staff member is named the first time; {stitle} is Dr., Ms., Mr. ...
STAFF_NAMED = ("{srole} {sname}", "{srole} {sname}", "{sname} ({srole})", "{stitle} {sname}", "our {srole} {sname}")
# The staff member's own details, framed as theirs ("I" when the staff member writes).
STAFF_DETAILS = {
    "third": (
        "{sfirst}'s direct line is {sphone}",
        "{sfirst} is at {sphone} if anything comes up",
        "questions to {sfirst} at {semail}",
        "{sfirst}'s own email is {semail}",
        "the {srole} can be reached at {sphone}",
        "reply to {semail} ({sfirst}'s inbox)",
        "{sname} can be reached at {semail}",
    ),
    "first": (
        "my direct line is {sphone}",
        "you can reach me at {semail}",
        "my cell is {sphone} if anything comes up",
        "email me at {semail} with questions",
    ),
}
# Someone else again: a colleague, an attendee, the recipient of the note.
SECOND_PERSON = (
    "{o2name} sat in",
    "cc {o2name}",
    "{o2name} will follow up",
    "also present: {o2name}",
    "{o2name} from billing is cc'd at {o2email}",
    "{o2name} covers weekends, {o2phone}",
    "{o2title} {o2name} signed off on it",
    "handing over to {o2name} ({o2phone})",
)
SIGNATURES = ("-- {sname}", "{sname}, {srole}", "{sname} | {srole} | {sphone}", "{sname}\n{semail}", "- {sfirst}")
# What the subject did, and remarks on an age: no field in them.
DOINGS = (
    "asked about parking",
    "prefers texts",
    "offered to bring references",
    "paid the deposit",
    "was very patient",
    "wants the premium plan",
    "needs a ground-floor room",
    "asked for a callback",
    "has a small dog",
    "left a nice review",
)
AGE_REMARKS = ("which we noted on the file", "which qualifies for the senior rate", "which matters for the plan")
SUBJECT_AGE = (
    "{First} ({age}) {doing}",
    "{First}, {age}, {doing}",
    "{Subj} is {age}, {remark}",
    "{a_age} y/o, {subj} {doing}",
    "{Subj} is {age}",
    "{Subj} is {a_age}-year-old",
    "age: {age}",
)
RELATIONS = ("my friend", "my cousin", "my neighbour", "a former colleague", "an old classmate", "my sister-in-law's friend")


def _period(sentence):
    """``sentence`` ended with a period, unless it ends with one already (``... Jr.``)."""
    return sentence if sentence.endswith(".") else sentence + "."


def _subject_refs(rng, written, person, role):
    """Pronouns, or the subject's first name (``Rodel``), for the third-person frames. A
    pronoun only when nobody else in the message shares it, so it can only mean the subject."""
    shared = any(person.get(f"{prefix}gender") == person["gender"] for prefix in ("s", "o2"))
    if "name" in written and (shared or rng.random() < 0.5):
        first = person["first"]
        return {"subj": first, "obj": first, "poss": f"{first}'s", "First": first, "Subj": first}
    if "name" not in written and shared:
        the = f"the {role}"
        return {"subj": the, "obj": the, "poss": f"{the}'s", "First": _capitalise(the), "Subj": _capitalise(the)}
    first = person["first"] if "name" in written else f"the {role}"
    subj = person["subj"]
    return {"subj": subj, "obj": person["obj"], "poss": person["poss"], "First": _capitalise(first), "Subj": _capitalise(subj)}


def _subject_sentences(rng, written, fields, refs):
    """One sentence per field of the subject, in the third person."""
    sentences = []
    for field in fields:
        if field == "age":
            template = rng.choice(SUBJECT_AGE)
            age = written["age"]
            article = "an" if age == "18" or age.startswith("8") or age[0].lower() == "e" else "a"
            values = {**refs, "age": age, "a_age": f"{article} {age}", "doing": rng.choice(DOINGS)}
            values["remark"] = rng.choice(AGE_REMARKS).format(**values)
            sentences.append(_capitalise(template.format(**values)) + ".")
        else:
            template = rng.choice(THIRD_PERSON[field])
            sentences.append(_capitalise(template.format(**written, **refs)) + ".")
    return sentences


def _scene_subject(rng, written, fields, role, trailing):
    """The subject as first named: ``guest Rodel Santos``, ``guest Rodel Santos, 61,``."""
    if "name" not in written:
        article = "an" if role[0] in "aeiou" else "a"
        return {
            "role": f"{article} {role}",
            "who": rng.choice(("who gave no name", "(no name given)", "who didn't leave a name")),
        }
    return {"role": role, "who": _with_age(rng, written, fields, trailing)["name"]}


def _staff_scene_message(rng, written, person):
    """Staff and the subject: a log, a note or an email by (or about) a member of staff."""
    subject_roles, staff_roles, headers, staff_acts, subject_acts = rng.choice(SCENES)
    _someone(rng, person, "s")
    role, person["srole"] = rng.choice(subject_roles), rng.choice(staff_roles)
    numbers = _noise_numbers(rng)
    fields = _shuffled_details(rng, written)
    second = rng.random() < 0.35
    if second:
        _someone(rng, person, "o2")
    first_person = rng.random() < 0.3
    if first_person:
        staff, act = "I", rng.choice(staff_acts)
    else:
        staff = _fill(rng.choice(STAFF_NAMED), written, person)
        act = rng.choice(staff_acts + subject_acts)
    tail = rng.choice(SCENE_TAILS)
    subject = _scene_subject(rng, written, fields, role, trailing=bool(tail) or not act.endswith("{who}"))
    act = _period(_capitalise(act.format(staff=staff, **subject, **numbers) + tail))
    refs = _subject_refs(rng, written, person, role)
    sentences = _subject_sentences(rng, written, fields, refs)
    extras = []
    # Most often when the subject gave no number or no address: theirs must stay null.
    if rng.random() < (0.5 if "phone" in written and "email" in written else 0.8):
        extras.append(rng.choice(STAFF_DETAILS["first" if first_person else "third"]))
    if second:
        extras.append(rng.choice(SECOND_PERSON))
    signed = first_person or rng.random() < 0.3
    # Short enough for the default job: at most five sentences and lines besides the first
    # (six when the writer, "I", signs).
    while extras and len(fields) + len(extras) + signed > 5:
        if signed and not first_person:
            signed = False
        else:
            extras.pop()
    for extra in extras:
        _insert(rng, sentences, _as_sentence(_fill(extra, written, person)))
    header = rng.choice(headers).format(**numbers) if rng.random() < 0.6 else ""
    message = header + act + " " + " ".join(sentences)
    if signed:
        message += "\n" + _fill(rng.choice(SIGNATURES), written, person)
    return message.strip()


def _introduction_message(rng, written, person):
    """An author introduces the subject to a recipient and signs with their own details."""
    _someone(rng, person, "s")
    _someone(rng, person, "o2")
    fields = _shuffled_details(rng, written)
    relation = rng.choice(RELATIONS)
    if "name" in written:
        who = _with_age(rng, written, fields, trailing=False)["name"]
        intro = rng.choice(
            (f"I'd like you to meet {who}, {relation}.", _period(f"Introducing {relation}, {who}"), f"Meet {who} ({relation}).")
        )
    else:
        intro = f"Passing along {relation}'s details (no name yet)."
    refs = _subject_refs(rng, written, person, "friend")
    sentences = _subject_sentences(rng, written, fields, refs)
    greeting = _fill(rng.choice(("Hi {o2first},", "Dear {o2title} {o2last},", "{o2first} -")), written, person)
    signature = _fill(
        rng.choice(("{sname}", "{sname}\n{sphone}", "{sname} | {semail}", "{sfirst}\n{stitle} {sname}, {semail}")),
        written,
        person,
    )
    closing = rng.choice(("Best,", "Thanks,", "Cheers,"))
    return f"{greeting}\n{intro} {' '.join(sentences)}\n{closing}\n{signature}"


def _forwarder_message(rng, written, person):
    """A forwarder relays a friend's details, with their own number or address as well."""
    _someone(rng, person, "s")
    fields = _shuffled_details(rng, written)
    if "name" in written and rng.random() < 0.5:
        # The friend's own words, quoted under the forwarder's header.
        header = _fill(
            rng.choice(("Fwd from {sname} ({sphone}):\n", "{sname} <{semail}> forwarded:\n", "From {sname}, {sphone}: ")),
            written,
            person,
        )
        clauses = _clauses(rng, FIRST_PERSON, fields, written, person, False)
        return (
            header
            + "> "
            + _fill(rng.choice(("hi, it's {name}", "{name} here", "this is {name}")), written, person)
            + ", "
            + ", ".join(clauses)
        )
    relation = rng.choice(RELATIONS)
    if "name" in written:
        who = _with_age(rng, written, fields, trailing=True)["name"]
        intro = f"{relation} {who} asked me to pass this on:"
    else:
        intro = f"{relation} (didn't want to give a name) asked me to pass this on:"
    opener = _fill(rng.choice(("{sname} here. ", "It's {sname}. ", "")), written, person)
    refs = _subject_refs(rng, written, person, "friend")
    sentences = _subject_sentences(rng, written, fields, refs)
    own = _fill(
        rng.choice(("My own number is {sphone}.", "I'm at {semail} if you need me.", "Reach me, not them, at {sphone}.")),
        written,
        person,
    )
    message = opener + _capitalise(intro) + " " + " ".join(sentences) + " " + own
    if not opener:
        message += "\n" + _fill(rng.choice(("-- {sname}", "{sname}")), written, person)
    return message


def _minutes_message(rng, written, person):
    """Minutes taken by a secretary: attendees, and the new member the record is about."""
    _someone(rng, person, "s")
    _someone(rng, person, "o2")
    fields = _shuffled_details(rng, written)
    club = rng.choice(("Garden club", "Book club", "Board", "Residents' association", "Choir", "Running club"))
    present = ["{sname}", "{o2name}"]
    rng.shuffle(present)
    header = f"{club} minutes, taken by {{sname}} (secretary). Present: {', '.join(present)}."
    if "name" in written:
        joined = rng.choice(
            ("{o2first} introduced new member {who}", "New member {who} was welcomed.", "{who} joined as a new member.")
        )
        who = _with_age(rng, written, fields, trailing=joined.startswith("{who}"))["name"]
        joined = _period(_fill(joined, {"who": who}, person))
    else:
        joined = "A new member joined (name to follow)."
    refs = _subject_refs(rng, written, person, "new member")
    sentences = _subject_sentences(rng, written, fields, refs)
    if len(fields) < 4 and rng.random() < 0.5:
        _insert(
            rng,
            sentences,
            _fill(
                rng.choice(("Secretary's email: {semail}.", "{o2first} moved to adjourn.", "Dues go to {o2first}, {o2phone}.")),
                written,
                person,
            ),
        )
    return _fill(header, written, person) + " " + _capitalise(joined) + " " + " ".join(sentences)


# --------------------------------------------------------------------------------------------
# Documents: the shapes contact details arrive in besides prose. A pasted spreadsheet row under
# its header, an OCR'd business card, an invoice or receipt (the vendor's own phone and e-mail vs
# the customer billed), a courier waybill (driver and dispatch vs the recipient), a chat thread
# with timestamps and speakers, a classified ad, a clinic intake note entered by staff (whose
# extension is not a phone), recruiter screening bullets, an RSVP, a forwarded e-mail with its
# headers, a long e-mail signature, a social post, a handwritten note, and a message addressed
# to a named reader by a sender who may give no name. A company here has a name, a street (never
# a city), a web site and its own phone and e-mail, tracked like another person's.
# --------------------------------------------------------------------------------------------

_CITY_PATTERN = re.compile(r"\b(?:" + "|".join(re.escape(city) for city in sorted(CITIES, key=len, reverse=True)) + r")\b")


def _clear_of_cities(pool):
    """The entries of ``pool`` that hold no city's name: a street or company naming a city would
    make the contact's city ambiguous."""
    return tuple(entry for entry in pool if not _CITY_PATTERN.search(entry))


COMPANY_WORDS = _clear_of_cities(
    _pool(
        """
        Northwind, Bluefern, Lakeside, Summit, Harborview, Maplewood, Cedarline, Pinecrest, Brightpath, Redwood,
        Oakridge, Silverline, Greenleaf, Ironwood, Clearwater, Stonebridge, Sunrise, Riverbend, Blue Heron,
        Copperleaf, Foxglove, Keystone, Larkspur, Tri-County, Evergreen, First Light, Granite, Westbrook, Kestrel
        """
    )
)
COMPANY_KINDS = _clear_of_cities(
    _pool(
        """
        Supply Co., Plumbing, Dental, Realty, Print Shop, Movers, Auto Repair, Catering, Landscaping, Electric,
        Flooring, Logistics, Veterinary Clinic, Pharmacy, Tile & Stone, Appliance Repair, Cleaning Services,
        Optometry, Hardware, Roofing, Family Medicine, Staffing, Insurance Group, Storage, Couriers
        """
    )
)
STREETS = _clear_of_cities(
    _pool(
        """
        Elm St., Oak Ave., Main Street, Pine Rd., Willow Lane, Birch Way, Mill Road, Spring St., Meadow Dr.,
        Chestnut Ave., Walnut St., Sycamore Ct., Hawthorne Blvd., Orchard Lane, Station Rd., Market St.,
        Canal Street, Quarry Rd., Industrial Pkwy, Commerce Dr., Harbor Rd., Ridge Rd., Sunset Blvd.
        """
    )
)
JOB_TITLES = _pool(
    """
    Senior Project Manager, Account Executive, Owner, Office Manager, Sales Associate, Registered Nurse,
    Field Technician, Principal Architect, Operations Lead, Realtor, Broker Associate, Paralegal,
    Director of Partnerships, Customer Success Manager, Head Chef, Structural Engineer, Independent Consultant
    """
)
ITEMS = _pool(
    """
    couch, mountain bike, standing desk, kayak, washer and dryer, road bike, crib, dining table, snowblower,
    upright piano, dresser, treadmill, camping trailer, bookshelf, lawn mower, sewing machine
    """
)
EXTENSION_RATE = 0.06  # of phones: "(452) 699-8689 ext. 214"; the record keeps the 10 digits
AGE_IN_WORDS_RATE = 0.08  # "thirty-five", "Forty two"
NO_NAME_HANDLE_RATE = 0.5  # of nameless contacts: an e-mail handle that reads like words


def _company(rng, person, prefix="c"):
    """A company with its own phone and e-mail, tracked like another person's: ``{cname}``,
    ``{cstreet}``, ``{csite}``, ``{cphone}``, ``{cemail}`` (for ``prefix`` ``c``)."""
    taken = person["taken"]
    word, kind = rng.choice(COMPANY_WORDS), rng.choice(COMPANY_KINDS)
    slug = re.sub(r"[^a-z]", "", (word + (kind.split()[0] if rng.random() < 0.5 else "")).lower())
    while True:
        area, exchange, line = _draw_phone(rng)
        if f"+1{area}{exchange}{line}" not in taken["phones"]:
            break
    local = rng.choice(("info", "billing", "orders", "hello", "office", "dispatch", "accounts", "sales", "frontdesk"))
    email = f"{local}@{slug}.example"
    if email in taken["emails"]:
        email = f"{local}2@{slug}.example"
    e164 = f"+1{area}{exchange}{line}"
    taken["phones"].add(e164)
    taken["emails"].add(email)
    street = f"{rng.randrange(1, 9999)} {rng.choice(STREETS)}" + rng.choice(
        ("", "", f", Suite {rng.randrange(2, 900)}", f", Unit {rng.randrange(1, 40)}")
    )
    values = {
        "name": f"{word} {kind}",
        "street": street,
        "site": rng.choice(("www.", "", "https://")) + f"{slug}.example",
        "phone": _spell_phone(rng, area, exchange, line),
        "email": email.upper() if rng.random() < 0.15 else email,
    }
    person.update({prefix + key: value for key, value in values.items()})
    person["track"].update({prefix + "phone": ("phones", e164), prefix + "email": ("emails", email)})
    return person


_UNITS = _pool(
    """
    zero, one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen, fourteen, fifteen,
    sixteen, seventeen, eighteen, nineteen
    """
)
_TENS = dict(zip(range(2, 10), _pool("twenty, thirty, forty, fifty, sixty, seventy, eighty, ninety")))


def _age_in_words(rng, age):
    """``thirty-five``, ``forty two``, ``Forty-two``, ``eighteen``."""
    tens, unit = divmod(age, 10)
    words = _UNITS[age] if age < 20 else _TENS[tens] + (rng.choice(("-", "-", " ")) + _UNITS[unit] if unit else "")
    return words.capitalize() if rng.random() < 0.3 else words


def _csv_cell(value, delimiter):
    return f'"{value}"' if delimiter.strip() and delimiter.strip() in value else value


TABLE_HEADERS = {
    "name": ("Name", "Full name", "full_name", "NAME", "Contact", "Customer Name", "Client", "name", "Full Name"),
    "age": ("Age", "AGE", "age", "Age (yrs)", "Yrs", "age_years"),
    "city": ("City", "CITY", "city", "Location", "Town", "Home City", "city/town"),
    "email": ("Email", "E-mail", "EMAIL", "email_address", "Email Address", "e-mail", "Mail"),
    "phone": ("Phone", "mobile", "Mobile", "PHONE", "Tel", "Cell", "phone_number", "Contact No", "Mobile #"),
    "date": ("Date", "Appt", "Start Date", "FOLLOW_UP", "Visit date", "Move-in", "date", "Booked for"),
}
EXTRA_COLUMNS = (
    ("ID", lambda rng, n: str(rng.randrange(100, 100000))),
    ("Status", lambda rng, n: rng.choice(("new", "active", "lead", "pending", "VIP", "Paid"))),
    ("Source", lambda rng, n: rng.choice(("web", "referral", "walk-in", "ad", "event", "Instagram"))),
    ("Amount", lambda rng, n: n["price"]),
    ("Qty", lambda rng, n: str(rng.randrange(1, 12))),
    ("Notes", lambda rng, n: rng.choice(("", "prefers text", "2nd visit", "paid cash", "VIP", "needs parking"))),
    ("Owner", lambda rng, n: "{ofirst}"),
    ("Ref", lambda rng, n: n["ticket"]),
)


def _table_message(rng, written, person):
    """A spreadsheet row pasted under its header: any delimiter, columns in any order, extra
    columns, blank cells."""
    numbers = _noise_numbers(rng)
    columns = [key for key in KEYS if key in written or rng.random() < 0.3]
    rng.shuffle(columns)
    for label, value in rng.sample(EXTRA_COLUMNS, rng.choice((0, 1, 1, 2))):
        _insert(rng, columns, (label, value(rng, numbers)))
    delimiter = rng.choice((",", ",", "\t", " | ", "|", ";", "; "))
    lower = rng.random() < 0.2
    header, row = [], []
    for column in columns:
        if isinstance(column, tuple):
            label, value = column
            value = _fill(value, written, person)
        else:
            label, value = rng.choice(TABLE_HEADERS[column]), written.get(column, rng.choice(("", "", "n/a", "-")))
        header.append(label.lower() if lower else label)
        row.append(_csv_cell(value, delimiter))
    lines = [delimiter.join(header), delimiter.join(row)]
    if delimiter.strip() == "|" and rng.random() < 0.5:
        lines = [f"| {line} |" for line in lines]
        lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
    intro = rng.choice(
        ("", "", "Pasted from the sign-up sheet:\n", "contacts_export.csv\n", "Row from the tracker:\n", "see row below\n")
    )
    return intro + "\n".join(lines)


def _business_card_message(rng, written, person):
    """An OCR'd business card: name, job title, company, street, web site, maybe a handwritten
    note on the back."""
    _company(rng, person)
    lines = [written.get("name", rng.choice(("[name illegible]", "(name smudged)")))]
    lines.append(rng.choice(JOB_TITLES))
    company = _fill("{cname}", written, person)
    lines.append(company.upper() if rng.random() < 0.4 else company)
    address = _fill("{cstreet}", written, person)
    if "city" in written:
        address += rng.choice((", ", " ", "\n")) + written["city"]
    lines.append(address)
    marks = {"phone": ("M: ", "Mobile ", "Cell: ", "T ", "Direct: ", "Ph. "), "email": ("E: ", "", "Email: ", "e. ")}
    contact = [rng.choice(marks[f]) + written[f] for f in ("phone", "email") if f in written]
    if contact:
        lines.append(rng.choice((" | ", "  ", "\n", " / ")).join(contact))
    if rng.random() < 0.6:
        lines.append(_fill("{csite}", written, person))
    note = []
    if "age" in written:
        note.append(rng.choice(("{subj}'s {age}", "age {age}", "{age} y/o")).format(**written, **person))
    if "date" in written:
        note.append(rng.choice(("follow up {date}", "call on {date}", "meeting {date}", "met {date}")).format(**written))
    if note or rng.random() < 0.3:
        note = note or [rng.choice(("met at the expo", "great lead!", "ask about bulk pricing"))]
        lines.append(rng.choice(("Handwritten on back: ", "[handwritten] ", "Note (back of card): ")) + ", ".join(note))
    header = rng.choice(("[Scanned business card]\n", "OCR:\n", "Business card (scan)\n", "", "Card text:\n"))
    noise = rng.choice(("", "", "|", "~", "=="))
    return header + "\n".join(lines) + (f"\n{noise}" if noise else "")


INVOICE_LINES = (
    "Gutter cleaning",
    "Labour (2 hrs)",
    "Parts",
    "Delivery fee",
    "Annual service",
    "Tile, 40 sq ft",
    "Exam + cleaning",
    "Catering for 12",
)


def _invoice_message(rng, written, person):
    """An invoice or receipt: the vendor's own phone and e-mail at the top, the customer (the
    contact) under BILL TO."""
    _company(rng, person)
    numbers = _noise_numbers(rng)
    vendor = [_fill("{cname}", written, person), _fill("{cstreet}", written, person)]
    vendor.append(_fill(rng.choice(("Tel {cphone} | {cemail}", "Phone: {cphone}", "{cemail}", "{cphone}")), written, person))
    if len(written) > 4 or rng.random() < 0.5:
        vendor.pop(1)  # no street
    title = rng.choice(
        ("INVOICE #INV-{order}", "Invoice {ticket}", "RECEIPT #{order}", "Sales receipt {code}", "Estimate #{order}")
    )
    label = rng.choice(("BILL TO:", "Bill to:", "Customer:", "Sold to:", "Billed to:"))
    fields = _shuffled_details(rng, written)
    who = written.get("name", rng.choice(("Cash customer", "Walk-in", "Guest checkout")))
    block = [f"{label} {who}"]
    for field in fields:
        if field == "age":
            block.append(
                rng.choice(("Senior discount applied (age {age})", "Age verified: {age}", "Customer age {age}")).format(**written)
            )
        elif field == "date":
            block.append(
                rng.choice(("Service date: ", "Date of service: ", "Delivery: ", "Due date: ", "Date: ")) + written["date"]
            )
        elif field == "city":
            block.append(rng.choice(("", "", "City: ", "Ship to: ")) + written["city"])
        else:
            block.append(rng.choice(("", "", f"{field.capitalize()}: ")) + written[field])
    items = rng.sample(INVOICE_LINES, 0 if len(fields) > 3 else 1 if len(fields) > 2 else rng.choice((1, 2)))
    body = [f"{item} {rng.choice(('.....', '  ', ' - '))} ${rng.randrange(20, 900)}.00" for item in items]
    body.append(f"TOTAL {numbers['price']}")
    if len(fields) < 4 and rng.random() < 0.4:
        _someone(rng, person, "s")
        body.append(_fill(rng.choice(("Sales rep: {sname}", "Served by {sfirst}", "Cashier: {sname}")), written, person))
    parts = ["\n".join(vendor), title.format(**numbers)]
    if rng.random() < 0.5:
        parts.reverse()
    return "\n".join([*parts, "\n".join(block), "\n".join(body)])


def _waybill_message(rng, written, person):
    """A courier waybill or delivery note: the shipper, driver and dispatch numbers are not the
    recipient's."""
    _company(rng, person)
    _someone(rng, person, "s")
    numbers = _noise_numbers(rng)
    tracking = f"{rng.choice(('ZX', 'WB', 'DN', 'TRK'))}-{rng.randrange(10000, 99999)}-{rng.choice(('US', 'CA', 'MX', 'B'))}"
    lines = [rng.choice(("WAYBILL ", "Delivery note ", "Consignment note ", "Bill of lading ")) + tracking]
    lines.append(
        _fill(rng.choice(("Shipper: {cname}, {cphone}", "From: {cname} ({cemail})", "Sender: {cname}")), written, person)
    )
    driver = ("Driver: {sname} ({sphone})", "Driver: {sname}", "Courier: {sfirst}, cell {sphone}")
    lines.append(_fill(rng.choice(driver if len(written) < 5 else driver[1:]), written, person))
    if len(written) < 5 and rng.random() < 0.4:
        lines.append(_fill(rng.choice(("Dispatch: {cphone}", "Dispatch: {cemail}")), written, person))
    label = rng.choice(("Deliver to: ", "Consignee: ", "Recipient: ", "Ship to: ", "Receiver: "))
    lines.append(label + written.get("name", rng.choice(("Occupant", "Resident", "(no name)"))))
    fields = _shuffled_details(rng, written)
    for field in fields:
        if field == "city":
            street = f"{rng.randrange(1, 999)} {rng.choice(STREETS)}, " if rng.random() < 0.6 else ""
            lines.append(f"{rng.choice(('Address: ', 'Dest: ', 'City: '))}{street}{written['city']}")
        elif field == "age":
            lines.append(rng.choice(("ID checked, age {age}", "Adult signature (age {age})")).format(**written))
        elif field == "date":
            lines.append(rng.choice(("Delivery date: ", "Deliver on: ", "ETA ", "Delivered ")) + written["date"])
        else:
            lines.append(
                rng.choice({"phone": ("Contact: ", "Tel: ", "Rcpt phone: "), "email": ("Notify: ", "Email: ")}[field])
                + written[field]
            )
    if len(written) < 5:
        lines.append(
            rng.choice(
                (
                    f"Pieces: {rng.randrange(1, 6)}  Weight: {rng.randrange(1, 80)} lb",
                    f"Order {numbers['order']}",
                    "Leave at side door",
                )
            )
        )
    return "\n".join(lines)


THREAD_ASKS = {
    "age": ("how old are you, if you don't mind?", "age?", "and you're over 18 right?"),
    "city": ("where are you based?", "what area are you in?", "which city?"),
    "email": ("what's your email?", "email for the receipt?", "can you send me your email"),
    "phone": ("best number to reach you?", "what's your cell?", "number?"),
    "date": ("when works for you?", "what day?", "when can you come by?"),
}
THREAD_ANSWERS = {
    "age": ("I'm {age}", "{age}", "I'm {age} btw"),
    "city": ("{city}", "I'm in {city}", "over in {city}"),
    "email": ("{email}", "it's {email}", "{email} thx"),
    "phone": ("{phone}", "my cell is {phone}", "{phone}, text is best"),
    "date": ("{date}", "{date} works", "how about {date}?"),
}


def _thread_message(rng, written, person):
    """A chat or text thread with timestamps and speaker labels; the contact's details come over
    several lines, some as answers to the other side's questions."""
    _someone(rng, person, "s")
    style = rng.choice(("me", "agent", "names"))
    if style == "me":
        me, them = "Me", rng.choice(("Them", "Seller", "Buyer", "Unknown"))
        opener = (
            me,
            rng.choice(("hi, is the {item} still available?", "hey, got your number from the flyer", "hi! saw your ad")),
        )
        intro = "this is {name}"
    elif style == "agent":
        me, them = "Agent", "Visitor"
        opener = (
            _fill(rng.choice(("{sname} (Support)", "Agent {sfirst}", "{sfirst} | Helpdesk")), written, person),
            "Hi! Can I get a few details?",
        )
        intro = "sure, I'm {name}"
    else:
        me = _fill("{sfirst}", written, person)
        them = person["first"] if "name" in written else rng.choice(("Guest", "New contact"))
        opener = (me, rng.choice(("welcome to the group!", "hi, following up from the meetup")))
        intro = "hi! full name is {name}"
    values = {**written, "item": rng.choice(ITEMS)}
    turns = [opener]
    if "name" in written:
        turns.append((them, intro))
    fields = _shuffled_details(rng, written)
    # Short enough for the default job: at most six lines, two details to a line when many.
    asks = max(0, 5 - len(turns) - len(fields))
    while fields:
        field = fields.pop(0)
        if asks and rng.random() < 0.5:
            asks -= 1
            turns.append((me, rng.choice(THREAD_ASKS[field])))
        answer = rng.choice(THREAD_ANSWERS[field])
        if len(fields) + len(turns) > 4 and fields and not answer.endswith("?"):
            answer += rng.choice((", ", " - ", " and ")) + "{" + fields.pop(0) + "}"
        turns.append((them, answer))
    if len(turns) < 6 and rng.random() < 0.3:
        turns.append((me, rng.choice(("great, thanks!", "perfect", "got it, see you then"))))
    hour, minute = rng.randrange(1, 13), rng.randrange(60)
    stamp = rng.choice(("[{h}:{m:02d}] ", "{h}:{m:02d} {ap} ", "({h}:{m:02d}) ", "[{h}:{m:02d}] "))
    ap = rng.choice(("AM", "PM", "am", "pm"))
    lines = []
    for speaker, text in turns:
        lines.append(stamp.format(h=hour, m=minute, ap=ap) + f"{speaker}: " + _fill(text, values, person))
        minute = min(59, minute + rng.randrange(0, 3))
    header = rng.choice(("", "", "Chat transcript\n", "Text thread:\n")) if len(written) < 5 else ""
    return header + "\n".join(lines)


CLASSIFIEDS = {
    "headline": (
        "FOR SALE: {item}, {price} OBO.",
        "Roommate wanted.",
        "FREE {item} - must pick up.",
        "Tutor available (math, ages 8-14).",
        "Lost cat, grey tabby.",
        "WANTED: used {item}.",
        "Garage sale!",
    ),
    "name": ("Ask for {name}.", "Contact {name}.", "- {name}", "Posted by {name}."),
    "age": ("I'm {age}, quiet, no pets.", "Seller is {age}.", "I'm {age}."),
    "city": ("Pickup in {city}.", "{city} area.", "Located in {city}.", "Near downtown {city}."),
    "email": ("Email {email}.", "Reply to {email}", "{email}"),
    "phone": ("Call or text {phone}.", "Txt {phone}", "{phone}, no calls after 9pm."),
    "date": ("Available {date}.", "Sale on {date}.", "Move-in {date}.", "Pick up by {date}."),
}


def _classified_message(rng, written, person):
    """A classified ad: terse sentences, a price, maybe a name to ask for."""
    numbers = _noise_numbers(rng)
    parts = [rng.choice(CLASSIFIEDS["headline"]).format(item=rng.choice(ITEMS), price=numbers["price"])]
    fields = _shuffled_details(rng, written)
    parts += [rng.choice(CLASSIFIEDS[field]).format(**written) for field in fields]
    if "name" in written:
        signed = rng.choice(CLASSIFIEDS["name"]).format(**written)
        parts.insert(len(parts) if signed.startswith("- ") else rng.randrange(1, len(parts) + 1), signed)
    header = rng.choice(("", "", "Classifieds > ", "[Community board] ", "Ad #{order}: ".format(**numbers)))
    return header + rng.choice((" ", "\n")).join(parts)


def _intake_message(rng, written, person):
    """A clinic or front-desk intake note entered by staff, whose extension is not a phone."""
    _someone(rng, person, "s")
    ext = rng.randrange(100, 1000) if rng.random() < 0.7 else rng.randrange(10, 100)
    fields = _shuffled_details(rng, written)
    labels = {
        "age": ("Age: ", "Age ", "Pt age: "),
        "city": ("Home: ", "City: ", "Resides: ", "From "),
        "email": ("Email: ", "E: ", "Portal email: "),
        "phone": ("Ph: ", "Cell: ", "Callback #: ", "Phone "),
        "date": ("Appt: ", "Next visit: ", "Booked ", "Appointment date: "),
    }
    lines = [rng.choice(("Patient: ", "Pt: ", "Client: ", "Walk-in: ")) + written.get("name", "(declined to give name)")]
    lines += [rng.choice(labels[field]) + written[field] for field in fields]
    extra = rng.random()
    if extra < 0.3:
        lines.append(_fill("Referred by Dr. {olast}", written, person))
    elif extra < 0.5:
        lines.append(_fill("Emergency contact: {oname} {ophone}", written, person))
    staff = rng.choice(("Entered by {sname}, ext. {ext}", "-- {sname} (front desk) x{ext}", "Taken by {sfirst}, ext {ext}"))
    lines.append(_fill(staff.replace("{ext}", str(ext)), written, person))
    header = rng.choice(("INTAKE\n", "Front desk intake - ", "New patient form\n", "", "Clinic note\n"))
    separator = rng.choice(("\n", "\n", "; ", " / "))
    return header + separator.join(lines)


def _screening_message(rng, written, person):
    """A recruiter's screening bullets, signed by the recruiter."""
    _someone(rng, person, "s")
    numbers = _noise_numbers(rng)
    bullet = rng.choice(("- ", "* ", "• ", "> "))
    role = rng.choice(("Data Analyst", "Warehouse Lead", "RN, nights", "Backend Engineer", "Bookkeeper", "Line Cook"))
    lines = [f"Phone screen - {role} (req {numbers['ticket']})"]
    lines.append(rng.choice(("Candidate: ", "Cand: ", "Name: ", "")) + written.get("name", "name TBD (referral)"))
    templates = {
        "age": ("Age {age}", "{age} y/o", "age: {age}"),
        "city": ("Based in {city}, open to hybrid", "Loc: {city}", "Lives in {city}, no relo"),
        "email": ("Email: {email}", "{email}", "Reach via {email}"),
        "phone": ("Cell: {phone}", "Ph {phone}", "{phone} (prefers text)"),
        "date": ("Available from {date}", "Start: {date}", "Onsite interview {date}"),
    }
    lines += [rng.choice(templates[field]).format(**written) for field in _shuffled_details(rng, written)]
    lines.insert(
        rng.randrange(2, len(lines) + 1),
        rng.choice((f"Comp: {numbers['price']}/wk", "Strong SQL", "5 yrs exp", "Needs visa sponsorship: no")),
    )
    signature = rng.choice(("Screened by {sname} (recruiter)", "-- {sname}, Recruiter, {sphone}", "{sfirst} ({semail})"))
    return "\n".join([lines[0]] + [bullet + line for line in lines[1:]] + [_fill(signature, written, person)])


EVENTS = ("Spring gala", "Alumni dinner", "Team offsite", "Book launch", "Charity 5K", "Open house", "Wedding reception")


def _rsvp_message(rng, written, person):
    """An event RSVP: the guest, maybe a plus-one who is someone else."""
    event = rng.choice(EVENTS)
    lines = [rng.choice(("RSVP: ", "RSVP - ", "Reply for the ")) + event]
    lines.append(rng.choice(("Guest: ", "Name: ", "Attendee: ")) + written.get("name", "(not given)"))
    labels = {
        "age": ("Age: ", "Age (for the kids' table?): "),
        "city": ("Travelling from: ", "City: ", "Coming from "),
        "email": ("Reply-to: ", "Email: "),
        "phone": ("Phone: ", "Mobile: ", "Text updates to "),
        "date": ("Arriving: ", "Date: ", "Attending on "),
    }
    lines += [rng.choice(labels[field]) + written[field] for field in _shuffled_details(rng, written)]
    extras = [rng.choice(("Attending: Yes", "Meal: vegetarian", "Meal: chicken", "Attending: yes (2)", "Dietary: none"))]
    if rng.random() < 0.5:
        extras.append(_fill(rng.choice(("Plus-one: {oname}", "Bringing {oname}", "+1: {oname}")), written, person))
    for extra in extras:
        lines.insert(rng.randrange(2, len(lines) + 1), extra)
    return "\n".join(lines)


def _forwarded_email_message(rng, written, person):
    """A forwarded e-mail with its headers: the people in From/To/Cc are not the contact."""
    _someone(rng, person, "s")
    _someone(rng, person, "o2")
    headers = [rng.choice(("---------- Forwarded message ---------", "Begin forwarded message:", "Fwd:"))]
    headers.append(
        _fill(rng.choice(("From: {sname} <{semail}>", "From: {semail}", "From: {stitle} {sname} <{semail}>")), written, person)
    )
    headers.append(
        rng.choice(("Subject: new client", "Subject: Fwd: contact details", "Subject: referral", "Subject: RE: sign-up"))
    )
    headers.append(_fill(rng.choice(("To: {o2name} <{o2email}>", "To: {o2email}", "To: {o2name}")), written, person))
    if len(written) < 4 and rng.random() < 0.4:
        headers.append(_fill("Cc: {oname}", written, person))
    fields = _shuffled_details(rng, written)
    if "name" in written:
        who = _with_age(rng, written, fields, trailing=False)["name"]
        intro = rng.choice((f"Please set up {who} in the system.", f"New client: {who}.", f"Details for {who} below."))
    else:
        intro = rng.choice(("New client, didn't catch the name.", "Details below (no name given)."))
    refs = _subject_refs(rng, written, person, "client")
    if len(fields) > 2:
        details = "; ".join(_clauses(rng, TERSE, fields, written, person, False)) + "."
    else:
        details = " ".join(_subject_sentences(rng, written, fields, refs))
    body = [_fill("Hi {o2first},", written, person), intro + " " + details]
    body.append(_fill(rng.choice(("Thanks,\n{sfirst}", "-- {sname}", "{sfirst}")), written, person))
    note = rng.choice(("", "", "", "FYI, see below.\n\n", "Can you handle this one?\n\n")) if len(written) < 5 else ""
    return note + "\n".join(headers) + "\n\n" + "\n".join(body)


def _long_signature_message(rng, written, person):
    """A reply above an e-mail signature with a job title, company, web site and a disclaimer."""
    _company(rng, person)
    body = [c + "." for c in _clauses(rng, FIRST_PERSON, [f for f in ("age", "date") if f in written], written, person, True)]
    body.insert(0, rng.choice(("Sounds good.", "Thanks, see you then.", "Confirming below.", "Happy to help.")))
    block = [written["name"]] if "name" in written else []
    block.append(rng.choice(JOB_TITLES) + rng.choice((" | ", ", ", "\n")) + _fill("{cname}", written, person))
    if "city" in written:
        block.append(rng.choice(("{city} office", "{city}", "Based in {city}")).format(**written))
    marks = {"phone": ("M ", "Mobile: ", "m. ", "C: "), "email": ("", "E ", "Email: ")}
    contact = [rng.choice(marks[f]) + written[f] for f in ("phone", "email") if f in written]
    if contact:
        block.append(" | ".join(contact))
    block.append(_fill("{csite}", written, person))
    tail = rng.choice(("", "", "Sent from my iPhone", "CONFIDENTIAL: intended for the addressee only.", "Pronouns: they/them"))
    quoted = _fill(rng.choice(("", "", "\n\n> {oname} wrote:\n> Can you confirm?")), written, person)
    return " ".join(body) + "\n\n" + "\n".join(block) + (f"\n{tail}" if tail else "") + quoted


def _social_post_message(rng, written, person):
    """A social or community-group post, maybe under a handle, with someone else's comment."""
    handle = (
        "@" + _made_up_name(rng, 2).lower() + rng.choice(HANDLE_WORDS) + rng.choice(("", "_", "")) + str(rng.randrange(1, 99))
    )
    if "name" in written:
        author = rng.choice(
            (f"{written['name']} · {rng.randrange(1, 23)}h", f"{written['name']} ({handle})", f"Posted by {written['name']}")
        )
    else:
        author = rng.choice((f"{handle} · {rng.randrange(1, 59)}m", f"Posted by {handle}", "Anonymous member"))
    item = rng.choice(ITEMS)
    clauses = _clauses(rng, FIRST_PERSON, _shuffled_details(rng, written), written, person, True)
    text = rng.choice((f"Selling my {item}!", "Looking for a roommate.", f"Anyone want a free {item}?", "Need a dog sitter!"))
    post = text + " " + ". ".join(clauses) + rng.choice((".", "!", " :)"))
    comment = _fill(
        rng.choice(("", "", "\n{ofirst}: is it still available?", "\n{oname}: shared!", "\nComment from {ofirst}: DM'd you")),
        written,
        person,
    )
    return author + "\n" + post + comment


def _handwritten_message(rng, written, person):
    """A handwritten-looking note: arrows, abbreviations, capitals, one detail a line."""
    fields = _shuffled_details(rng, written)
    lines = []
    if "name" in written:
        lines.append(rng.choice(("NEW CLIENT -> ", "new lead: ", "** ", "CALLED: ", "re: ")) + written["name"])
    else:
        lines.append(rng.choice(("?? no name", "NEW LEAD (name?)", "caller - didn't get name")))
    lines += _clauses(rng, TERSE, fields, written, person, False)
    if rng.random() < 0.3:
        lines.append(
            _fill(rng.choice(("NOT {ophone} (that's the office)", "(via {ofirst})", "{ofirst} to follow up")), written, person)
        )
    if rng.random() < 0.3:
        lines[-1] = f"*{lines[-1]}*"
    header = rng.choice(("(handwritten note, scanned)\n", "[photo of sticky note]\n", "", "Note:\n"))
    return header + rng.choice(("\n", "\n", " / ")).join(lines)


def _addressed_message(rng, written, person):
    """A message to a named reader ("Hi Rocio,"): the reader is not the contact; the sender may
    sign with a name or give none."""
    greeting = _fill(
        rng.choice(("Hi {ofirst},", "Dear {otitle} {olast},", "Hey {ofirst}!", "{ofirst} -", "Hello {ofirst},")), written, person
    )
    fields = _shuffled_details(rng, written)
    sentences = [c + "." for c in _clauses(rng, FIRST_PERSON, fields, written, person, True)]
    sentences.insert(
        0,
        rng.choice(
            (
                "I saw your listing.",
                "Following up on the flyer.",
                "Quick question about the class.",
                "Thanks for your help today.",
            )
        ),
    )
    closing = rng.choice(("Thanks,", "Best,", "Cheers,", "Regards,"))
    if "name" in written:
        sign = written["name"] if rng.random() < 0.7 else f"{written['name']}\n{rng.choice(JOB_TITLES)}"
    else:
        sign = rng.choice(("", "Sent from my phone", "(a neighbour)", "A concerned parent"))
    return f"{greeting}\n{' '.join(sentences)}\n{closing}" + (f"\n{sign}" if sign else "")


DOCUMENT_KINDS = (
    _table_message,
    _table_message,
    _business_card_message,
    _invoice_message,
    _waybill_message,
    _thread_message,
    _classified_message,
    _intake_message,
    _screening_message,
    _rsvp_message,
    _forwarded_email_message,
    _long_signature_message,
    _social_post_message,
    _handwritten_message,
    _addressed_message,
    _addressed_message,
)


SCENE_KINDS = (
    _staff_scene_message,
    _staff_scene_message,
    _staff_scene_message,
    _introduction_message,
    _forwarder_message,
    _minutes_message,
)


MESSAGE_KINDS = (
    _email_message,
    _note_message,
    _chat_message,
    _crm_message,
    _form_message,
    _voicemail_message,
    _signature_message,
    _phone_slip_message,
    _order_message,
    _roster_message,
    _bio_message,
    _forwarded_text_message,
)


def _rough_tokens(text):
    """About as many as SmolLM2's tokenizer makes (measured 1.0-1.4 times fewer): a token per digit,
    per punctuation mark and per line, and a token and a half for a six-letter word."""
    letters = sum(c.isalpha() for c in text)
    digits_and_marks = sum(not c.isalpha() and not c.isspace() for c in text)
    return letters / 6 + len(re.findall(r"[A-Za-z]+", text)) / 2 + digits_and_marks + text.count("\n")


def _draw(rng):
    """``(message, record, written, others)``: ``others`` holds the names (as written), phone
    numbers (E.164) and e-mails (lowercased) of people other than the contact that the message
    shows."""
    while True:
        record, written, drawn = _draw_person(rng)
        if len(compact(record)) <= MAX_ANSWER_CHARS:
            break
    r = rng.random()
    kinds = DOCUMENT_KINDS if r < DOCUMENT_RATE else SCENE_KINDS if r < DOCUMENT_RATE + SCENE_RATE else MESSAGE_KINDS
    # A message too long for the default job's 256 tokens is written again, in another kind
    # of the same group, and after three tries in a short kind.
    for attempt in range(4):
        person = copy.deepcopy(drawn)
        message = rng.choice(kinds if attempt < 3 else MESSAGE_KINDS)(rng, written, person)
        if _rough_tokens(USER_PREFIX + message + compact(record)) <= MAX_ROUGH_TOKENS:
            break
    if "age" in written and not written["age"].isdigit():
        message = message.replace(f"{written['age']}yo", f"{written['age']} yo")
    return message, record, written, person["shown"]


def _unique_draws(seed, exclude):
    """Endless ``(message, record, written, others)`` draws, no message twice nor in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude)
    while True:
        draw = _draw(rng)
        if draw[0] not in seen:
            seen.add(draw[0])
            yield draw


def generate_examples(n, seed, exclude=()):
    """``n`` examples, the same for the same ``seed`` (an int or a str).

    :param exclude: messages not to produce (those of another split).
    :return: dicts with ``message``, ``record`` (keys in ``KEYS`` order), ``messages`` (the
        chat form written to the JSONL files) and ``others`` (``{"names": [...], "phones":
        [...], "emails": [...]}``: other people's names, E.164 numbers and lowercased e-mails
        the message shows).
    """
    return [
        {
            "message": message,
            "record": record,
            "messages": [user_message(message), {"role": "assistant", "content": compact(record)}],
            "others": others,
        }
        for message, record, _, others in itertools.islice(_unique_draws(seed, exclude), n)
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


def _without_extension(phone):
    return re.sub(r",? (ext\.? |x)\d+$", "", phone)


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
        as_written = _without_extension(written["phone"])
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
        message, record, written, _ = next(d for d in draws if mistake in _applicable_mistakes(*d[1:3]))
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
