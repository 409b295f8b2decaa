"""Patterns and validators for personal PII that is not a bank number: names, dates of birth,
passport numbers and IP addresses. `privacy.redaction` turns them into detectors.

No NER model can be loaded offline, so names are found by their surroundings, and the rules
say exactly what is caught:
- a title and capitalised words: "Mr John Smith", "Dr. O'Brien", "Frau Müller", "Mme Dupont";
  "Miss", "Sir", "Dame", "Lord" and "Lady" need two words ("Miss Estimates" is an earnings miss);
- a name label: "name: Jane Doe", "account holder John Smith", "Dear Ms Li", "cardholder: J. Smith";
  after "name:" / "name =" lower-case words count too ("Name: jane doe"), at most two;
  "customer", "client", "beneficiary", "payee", "applicant" take two or more capitalised words;
- a common first name (`FIRST_NAMES`) followed by a capitalised surname: "Sarah Connor", or both in
  capitals as forms and payment messages write them: "JOHN DOE";
- every further occurrence (as written, capitalised or in capitals) of a word of a name found by
  these rules: "Mrs Jane Doe ... Doe said" masks both.
Not caught: a bare surname or a lone first name without a title or label, names in lower case
outside a "name:" field ("jane doe called"), names in capitals that do not start with a common
first name ("J SMITH"), scripts other than Latin, and name words in `NOT_NAME_WORDS` (which keeps
"Customer Service Team" and "Dr Copper" whole).

Dates of birth are full dates (day, month, year) after a birth label ("born", "DOB", "date of
birth", "geboren", "né le", ...) within a short phrase, in ISO, numeric (12/04/1990, 12.04.1990,
12-04-90) and written forms (12 April 1990, 12th of Apr 1990, April 12, 1990). Dates without such
a label are left alone: financial text is full of trade, settlement and report dates.

Passport numbers are 6 to 9 letters and digits (at least four digits) after a passport label in
English, French, Spanish, Italian, German or Dutch, which covers the formats of the UK and US
(9 digits, or a letter and 8 digits), Germany (C01X00T47), France (12AB34567), India (J8369854),
Canada (AB123456), China (E12345678) and Ireland (PA1234567).
IP addresses are IPv4 (each part up to 255, with an optional /prefix or :port) and IPv6 (what
Python's `ipaddress` accepts, written with at least two colons and a hex digit).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from datetime import date

_UPPER = "A-ZÀ-ÖØ-Þ"
_LOWER = "a-zß-öø-ÿ"
_NAME_WORD = rf"(?:[{_UPPER}]['’])?[{_UPPER}][{_LOWER}]+(?:[{_UPPER}][{_LOWER}]+)?(?:-[{_UPPER}][{_LOWER}]+)?"
_INITIAL = rf"[{_UPPER}]\."
_PARTICLE = r"(?:van|von|der|den|de|del|della|di|da|du|le|la|bin|ibn|al|ten|ter)"
_NAME_TOKEN = rf"(?:{_NAME_WORD}|{_INITIAL})"
_NAME_SEQUENCE = rf"{_NAME_TOKEN}(?:\s(?:{_PARTICLE}\s)?{_NAME_TOKEN}){{0,3}}"
_END = r"(?![\w'’-])"

FIRST_NAMES = frozenset(
    """
    Aaron Adam Ahmed Aisha Alan Albert Alessandro Alexander Alexandra Alice Alicia Amanda Amit Amy Ana Anders Andrea
    Andreas Andrew Angela Anil Anita Ann Anna Anne Anthony Antonio Arjun Arthur Barbara Benjamin Betty Brian Bruce
    Camille Carlos Carmen Caroline Catherine Charles Charlotte Chiara Chloe Christina Christine Christopher Claire
    Claudia Connor Cynthia Daniel Daniela Daniele David Deborah Deepak Denise Dennis Diana Diane Dmitri Donald Donna
    Dorothy Douglas Edward Elena Elizabeth Emily Emma Eric Erik Ethan Eva Evelyn Fatima Francesca Francesco François
    Gary George Giovanni Giulia Giuseppe Gregory Hannah Hans Harold Harry Heather Helen Henry Hiroshi Ingrid Isabel
    Isabella Ivan Jacob Jacqueline Jacques James Jane Janet Janice Jason Javier Jean Jeffrey Jennifer Jeremy Jessica
    Joan João Johann John Jonathan Joseph Joshua José Juan Judith Julia Julie Jürgen Karen Katherine Kathleen Kenji
    Kenneth Kevin Kimberly Klaus Lars Laura Lauren Linda Lisa Lucas Lucía Luca Luis Luke Manuel Marco Margaret Maria
    Marie Martha Mary Matthew Megan Melissa Michael Michelle Miguel Mohammed Muhammad Nancy Natalie Natasha Nathan
    Nicholas Nicole Noah Olga Oliver Olivia Pamela Patricia Patrick Paul Pedro Peter Pierre Pooja Priya Rachel Rahul
    Rajesh Rebecca Richard Robert Ronald Ruth Ryan Samantha Samuel Sandra Sarah Sean Sergei Sharon Sophia Sophie
    Stefan Stephanie Stephen Steven Susan Sven Teresa Theresa Thomas Timothy Victoria Virginia Wolfgang Yuki Zachary
    """.split()
)
"""Common first names of several languages. Names that are also market words (Will, Bill, Mark,
Grant, Chase, Rose, May, June, April, Price, Sterling, Morgan, Christian, Jordan) are left out."""

NOT_NAME_WORDS = frozenset(
    """
    the and of for from with bank banks group holdings inc ltd plc llc corp co company capital street fund funds
    partners securities service services team support relations desk account accounts market markets index trust
    financial finance asset assets management investment investments energy insurance copper gold oil crude
    estimates estimate right wrong yield yields rate rates stock stocks bond bonds price prices dollar euro
    monday tuesday wednesday thursday friday saturday sunday january february march april may june july august
    september october november december care valued dear river equity analyst senior junior chief vice president
    centre center office department manager director officer
    """.split()
)
"""Capitalised words that a name rule would otherwise take for a name (compared case-folded)."""

_TITLE = r"Mr|Mrs|Ms|Mx|Dr|Prof|Herr|Frau|Mme|Mlle|Madame|Monsieur|Señor|Señora|Señorita|Signor|Signora"
_TWO_WORD_TITLE = r"Miss|Sir|Dame|Lord|Lady"
_NAME_LABEL = (
    r"(?:full\s|first\s|last\s|customer\s|client\s|account\s|holder\s|beneficiary\s|payee\s|sender\s|recipient\s)?"
    r"name|account\sholder|card\s?holder|signatory|dear|attn\.?"
)
_PARTY_LABEL = r"customer|client|beneficiary|payee|remitter|applicant|borrower|guarantor"

TITLED_NAME = re.compile(rf"\b(?:{_TITLE})\.?\s(?P<value>{_NAME_SEQUENCE}){_END}")
TWO_WORD_TITLED_NAME = re.compile(rf"\b(?:{_TWO_WORD_TITLE})\s(?P<value>{_NAME_SEQUENCE}){_END}")
LABELLED_NAME = re.compile(
    rf"(?i:\b(?:{_NAME_LABEL}))(?!\w)\s*[:=–-]?\s*(?:(?:{_TITLE}|{_TWO_WORD_TITLE})\.?\s)?(?P<value>{_NAME_SEQUENCE}){_END}"
)
NAME_FIELD = re.compile(r"(?i:\bname\s?[:=])\s*(?P<value>[^\W\d_]{2,}(?:\s[^\W\d_]{2,})?)(?!\w)")
PARTY_NAME = re.compile(rf"(?i:\b(?:{_PARTY_LABEL}))(?!\w)\s*[:=–-]?\s*(?P<value>{_NAME_SEQUENCE}){_END}")
FIRST_NAME_SURNAME = re.compile(
    rf"(?<![\w'’-])(?P<value>(?:{'|'.join(sorted(FIRST_NAMES))})\s(?:{_INITIAL}\s)?{_NAME_WORD}){_END}"
)
CAPITALS_FIRST_NAME_SURNAME = re.compile(
    rf"(?<![\w'’-])(?P<value>(?:{'|'.join(sorted(name.upper() for name in FIRST_NAMES))})"
    rf"\s(?:[A-Z]\.\s)?[A-Z]{{2,}}(?:['’-][A-Z]{{2,}})?){_END}"
)

_MONTH = (
    r"jan(?:uary|uar|vier)?|feb(?:ruary|ruar)?|févr(?:ier)?|mar(?:ch|s)?|märz|apr(?:il)?|avr(?:il)?|may|mai|"
    r"jun(?:e|i)?|juin|jul(?:y|i)?|juil(?:let)?|aug(?:ust)?|août|sep(?:t(?:ember|embre)?)?|oct(?:ober|obre)?|okt(?:ober)?|"
    r"nov(?:ember|embre)?|dec(?:ember)?|dez(?:ember)?|déc(?:embre)?|"
    r"enero|febrero|marzo|abril|mayo|junio|julio|agosto|septiembre|octubre|noviembre|diciembre"
)
_ORDINAL = r"(?:st|nd|rd|th|er)?"
_DATE = (
    r"(?<!\d)(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}"
    r"|\d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d{2})"
    rf"|\d{{1,2}}{_ORDINAL}\.?[\s-]+(?:of\s+)?(?:{_MONTH})\.?,?[\s-]+\d{{4}}"
    rf"|(?:{_MONTH})\.?\s+\d{{1,2}}{_ORDINAL},?\s+\d{{4}})(?!\d)"
)
_BIRTH_LABEL = (
    r"born|d\.?o\.?b\b\.?|date\s+of\s+birth|birth\s*date|birthday|geburtsdatum|geboren(?:\s+am)?|geb\.|"
    r"née?\s+le|date\s+de\s+naissance|fecha\s+de\s+nacimiento|nacid[oa]\s+el|data\s+di\s+nascita|nat[oa]\s+il"
)
DATE_OF_BIRTH = re.compile(
    rf"\b(?:{_BIRTH_LABEL})(?!\w)(?:[^\d\n;!?.]|\.(?!\s)){{0,30}}?(?P<value>{_DATE})", re.IGNORECASE
)

_PASSPORT_LABEL = r"passports?|passeport|pasaporte|passaporto|reisepass(?:nummer)?|paspoort(?:nummer)?"
PASSPORT = re.compile(
    rf"(?i:\b(?:{_PASSPORT_LABEL})\b(?:\s*(?:no|nr|num|number|numéro|número|numero|id)\b\.?|\s*(?:#|n°|nº))?)"
    r"(?:\s*\([^()\d]{2,20}\))?\s*(?:[:#]|\bis\b)?\s*(?P<value>[A-Za-z0-9]{6,9})(?![\w-])"
)

IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?:/\d{1,2}(?!\d)|:\d{1,5}(?!\d))?(?!\.?\w)")
IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?![\w:])")


def _name_words(candidate: str) -> list[str]:
    return [word.strip(".") for word in candidate.split()]


def is_name(candidate: str) -> bool:
    """At least one real name word (2+ letters), and no word that is a known non-name."""
    words = _name_words(candidate)
    return any(len(word) >= 2 for word in words) and not any(word.casefold() in NOT_NAME_WORDS for word in words)


def is_full_name(candidate: str) -> bool:
    """A name of at least two words, initials aside: a first name and a surname."""
    return is_name(candidate) and sum(len(word) >= 2 for word in _name_words(candidate)) >= 2


def _day_month_year(parts: list[int]) -> Iterator[tuple[int, int, int]]:
    first, second, third = parts
    if first > 31:  # year first
        yield third, second, first
    else:
        year = third + (1900 if 30 <= third < 100 else 2000 if third < 30 else 0)
        yield first, second, year
        yield second, first, year


def is_plausible_date(candidate: str) -> bool:
    """A numeric date that exists read as D/M/Y or M/D/Y (or Y-M-D); written months always pass."""
    numbers = [int(part) for part in re.findall(r"\d+", candidate)]
    if len(numbers) != 3:
        return len(numbers) == 2 and 1 <= numbers[0] <= 31
    for day, month, year in _day_month_year(numbers):
        try:
            date(year, month, day)
        except ValueError:
            continue
        return 1900 <= year <= 2100
    return False


def is_passport_number(candidate: str) -> bool:
    """6 to 9 characters with at least four digits, not a year or amount written with letters."""
    return sum(ch.isdigit() for ch in candidate) >= 4 and not candidate.isalpha()


def is_ipv4(candidate: str) -> bool:
    address = re.split(r"[/:]", candidate)[0]
    return all(int(part) <= 255 for part in address.split("."))


def is_ipv6(candidate: str) -> bool:
    if not any(ch in "0123456789abcdefABCDEF" for ch in candidate):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def name_echoes(text: str, names: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans of further occurrences of the words of names found at `names` (same case or all capitals)."""
    words = {
        word
        for start, end in names
        for word in re.findall(r"[^\W\d_]{2,}", text[start:end])
        if word.casefold() not in NOT_NAME_WORDS and not re.fullmatch(_PARTICLE, word)
    }
    if not words:
        return []
    forms = sorted({form for word in words for form in (word, word.upper(), word.capitalize())}, key=len, reverse=True)
    pattern = re.compile(rf"(?<![\w'’-])(?:{'|'.join(map(re.escape, forms))}){_END}")
    return [found.span() for found in pattern.finditer(text)]
