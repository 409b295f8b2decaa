"""PII redaction for financial text, applied before anything is logged or written to an audit trail.

Each kind of PII has a detector: a regular expression that finds candidates and, where the
format has one, a validator that rejects look-alikes (mod-97 and the country's length and layout
for IBANs through python-stdnum, Luhn and issuer prefixes for cards, the numbering plan's possible
lengths for international phones through phonenumbers, digit counts for national phones,
allocation rules for SSNs and UK NI numbers, part ranges for IP addresses). Names, dates of birth,
passport numbers and IP addresses come from `privacy.pii_personal`, whose docstring says which
names and dates are caught and which are not.
Financial text is full of digit runs that are not PII (amounts, dates, ISINs, CUSIPs, order
ids), so every detector refuses to start or end inside a longer token, and bare numbers are
only called account numbers when a label says so ("account no.", "sort code", a BIC followed
by a number, SWIFT fields :50:/:59:) or when a UK sort code precedes them ("12-34-56 12345678"),
and an ISO date after such a label is still a date.

A candidate that fails validation is retried without trailing groups the pattern may have
swallowed: words after an IBAN ("BE68 5390 0754 7034 FROM"), any digit group after a card or
phone number ("+44 20 7946 0958 2024"). IBANs drop words only: each retry is another 1-in-97
chance of a look-alike passing the check.
Overlapping findings are resolved longest first (then by the order of `KINDS`), so the digit
groups inside an IBAN are never redacted a second time as a card or phone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum.exceptions import ValidationError

from fingpt_federated.privacy import pii_personal as personal

KINDS = (
    "IBAN",
    "CARD",
    "EMAIL",
    "NATIONAL_ID",
    "PASSPORT",
    "PHONE",
    "IP_ADDRESS",
    "ACCOUNT",
    "DATE_OF_BIRTH",
    "PERSON",
)

GENERIC_NATIONAL_ID_PATTERNS: tuple[str, ...] = (
    r"[A-Z]{6}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z]",  # Italian codice fiscale
    r"[A-Z]{3}[ABCFGHJLPT][A-Z]\d{4}[A-Z]",  # Indian PAN
    r"\d{8}-?[TRWAGMYFPDXBNJZSQVHLCKE]",  # Spanish DNI
    r"[XYZ]-?\d{7}-?[TRWAGMYFPDXBNJZSQVHLCKE]",  # Spanish NIE
    r"\d{3}-\d{3}-\d{3}",  # Canadian SIN
)

SHORT_TEXT_CHARS = 24
SHORT_TEXT_CACHE = 8192
_KIND_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_DIGIT = re.compile(r"\d")
_AT = re.compile("@")
_COLON = re.compile(":")
_SEPARATORS = " -."

# Numbers must not start inside a longer number ("2024-03-15", "1 250 000") or glued to a word
# ("T+2", "US0378331005"), nor end glued to one.
_NUM_START = r"(?<![\w+])(?<!\d[ ./-])"
_NUM_END = r"(?!\w)"

_IBAN = re.compile(
    r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}"
    r"(?:[A-Za-z0-9]{11,30}|(?: [A-Za-z0-9]{4}){2,7}(?: [A-Za-z0-9]{1,4})?)(?![A-Za-z0-9])"
)
_CARD = re.compile(_NUM_START + r"(?:\d{13,19}|\d{4}([ -])\d{1,6}(?:\1\d{1,6}){1,4})" + _NUM_END)
_CARD_ISSUER = re.compile(r"4|5|6|3[0456789]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)")
_EMAIL = re.compile(
    r"(?<![\w.+%-])[A-Za-z0-9_%+-](?:[A-Za-z0-9._%+-]*[A-Za-z0-9_%+-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
_PHONE_INTERNATIONAL = re.compile(
    _NUM_START + r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?[ .-]?\d{1,14}(?:[ .-]\d{1,14}){0,6}" + _NUM_END
)
_PHONE_NANP_PARENS = re.compile(_NUM_START + r"(?:1[ .-]?)?\([2-9]\d{2}\)[ .-]?[2-9]\d{2}[ .-]\d{4}" + _NUM_END)
_PHONE_NANP = re.compile(_NUM_START + r"(?:1[.-])?[2-9]\d{2}([.-])[2-9]\d{2}\1\d{4}" + _NUM_END)
_PHONE_TRUNK = re.compile(_NUM_START + r"0\d{1,4}(?:[ -]\d{2,8}){1,4}" + _NUM_END)
_PHONE_UK_MOBILE = re.compile(_NUM_START + r"07\d{9}" + _NUM_END)
_SSN = re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])")
_SSN_LABELLED = re.compile(
    r"(?i:\b(?:ssn|social security (?:number|no\.?)))\s*[:#]?\s*(?P<value>\d{3}[ -]?\d{2}[ -]?\d{4})" + _NUM_END
)
_UK_NI = r"(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
_UK_NI_SPACED = re.compile(r"(?<!\w)" + _UK_NI + r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?!\w)")
_UK_NI_COMPACT = re.compile(r"(?i)(?<!\w)" + _UK_NI + r"\d{6}[A-D](?!\w)")

_ACCOUNT_WORD = r"(?:account|acct|acc|a/c|konto(?:nummer)?|compte|cuenta|conto)\b\.?"
_NUMBER_WORD = r"(?:\s*(?:(?:no|nr|num|number)\b\.?|#|n°))?"
_BIC = r"[A-Z]{6}[A-Z2-9][A-NP-Z0-9](?:[A-Z0-9]{3})?"
_ACCOUNT = re.compile(
    r"(?:(?i:\b" + _ACCOUNT_WORD + _NUMBER_WORD + r"|\bsort[ -]?code|\b(?:bic|swift)(?:[ /](?:bic|code))?)"
    r"(?:\s*[:#]?\s*" + _BIC + r")?"
    r"|\b" + _BIC + r"(?=/)"
    r"|:(?:50|59)[AFK]?:)"
    r"\s*[:#/,;]?\s*(?!\d{4}-\d{2}-\d{2}(?!\d))(?P<value>\d(?:[ -]?\d){5,33})" + _NUM_END
)
_SORT_CODE_AND_ACCOUNT = re.compile(r"(?<![\w-])\d{2}([- ]?)\d{2}\1\d{2}(?:\s*[,/;]\s*|\s+)\d{8}" + _NUM_END)


@dataclass(frozen=True)
class Match:
    """One finding: `text[start:end]` is PII of `kind`."""

    kind: str
    start: int
    end: int


def _no_tail(tail: str) -> bool:
    return False


def _any_tail(tail: str) -> bool:
    return True


def _words_tail(tail: str) -> bool:
    return tail.replace(" ", "").isalpha()


@dataclass(frozen=True)
class _Detector:
    """How one format is found.

    `pattern` proposes candidates (only `group` of the match is PII), `accept` validates them,
    retrying without the tails `droppable` allows, and text in which `hint` does not occur is
    skipped without running the slower pattern.
    """

    kind: str
    pattern: re.Pattern[str]
    accept: Callable[[str], bool] | None = None
    group: str | int = 0
    droppable: Callable[[str], bool] = _no_tail
    hint: re.Pattern[str] | None = _DIGIT


def is_valid_iban(candidate: str) -> bool:
    """ISO 13616: country letters, two check digits, the rearranged number is 1 mod 97, and the
    length and layout are the country's."""
    compact = candidate.replace(" ", "")
    letters = [ch for ch in compact if ch.isalpha()]
    if not 15 <= len(compact) <= 34 or not (all(ch.isupper() for ch in letters) or all(ch.islower() for ch in letters)):
        return False
    compact = compact.upper()
    if not (compact[:2].isalpha() and compact[2:4].isdigit() and compact.isalnum() and compact.isascii()):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1 and _has_country_layout(compact)


def _has_country_layout(compact: str) -> bool:
    """python-stdnum's registry of IBAN lengths and layouts per country. Its national checks
    (bank registries, BBAN check digits) are left out: they refuse real IBANs of banks it lacks."""
    try:
        stdnum_iban.validate(compact, check_country=False)
    except ValidationError:
        return False
    return True


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number carries in its last digit."""
    total = 0
    for position, ch in enumerate(reversed(digits)):
        value = int(ch) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def is_card_number(candidate: str) -> bool:
    """13 to 19 digits, an issuer prefix that card networks use, and a valid Luhn check digit."""
    digits = re.sub(r"\D", "", candidate)
    return 13 <= len(digits) <= 19 and _CARD_ISSUER.match(digits) is not None and luhn_valid(digits)


def is_valid_ssn(candidate: str) -> bool:
    """US SSNs never have area 000, 666 or 9xx, group 00 or serial 0000."""
    digits = re.sub(r"\D", "", candidate)
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def is_possible_international_phone(candidate: str) -> bool:
    """A +country number whose length the country's numbering plan allows (phonenumbers)."""
    try:
        number = phonenumbers.parse(candidate)
    except phonenumbers.NumberParseException:
        return False
    return bool(phonenumbers.is_possible_number(number))


def _digit_count(low: int, high: int) -> Callable[[str], bool]:
    def accept(candidate: str) -> bool:
        return low <= sum(ch.isdigit() for ch in candidate) <= high

    return accept


def _bounded(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    """A configured pattern, refused where it would start or end inside a longer word or number."""
    source = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    flags = pattern.flags if isinstance(pattern, re.Pattern) else 0
    return re.compile(r"(?<!\w)(?:" + source + r")(?!\w)", flags)


def _builtin_detectors(national_id_patterns: Iterable[str | re.Pattern[str]]) -> list[_Detector]:
    return [
        _Detector("IBAN", _IBAN, is_valid_iban, droppable=_words_tail),
        _Detector("CARD", _CARD, is_card_number, droppable=_any_tail),
        _Detector("EMAIL", _EMAIL, hint=_AT),
        _Detector("NATIONAL_ID", _SSN, is_valid_ssn),
        _Detector("NATIONAL_ID", _SSN_LABELLED, is_valid_ssn, "value"),
        _Detector("NATIONAL_ID", _UK_NI_SPACED),
        _Detector("NATIONAL_ID", _UK_NI_COMPACT),
        *(_Detector("NATIONAL_ID", _bounded(pattern), hint=None) for pattern in national_id_patterns),
        _Detector("PASSPORT", personal.PASSPORT, personal.is_passport_number, "value"),
        _Detector("PHONE", _PHONE_INTERNATIONAL, is_possible_international_phone, droppable=_any_tail),
        _Detector("PHONE", _PHONE_NANP_PARENS),
        _Detector("PHONE", _PHONE_NANP),
        _Detector("PHONE", _PHONE_TRUNK, _digit_count(10, 11), droppable=_any_tail),
        _Detector("PHONE", _PHONE_UK_MOBILE),
        _Detector("IP_ADDRESS", personal.IPV4, personal.is_ipv4),
        _Detector("IP_ADDRESS", personal.IPV6, personal.is_ipv6, hint=_COLON),
        _Detector("ACCOUNT", _ACCOUNT, group="value"),
        _Detector("ACCOUNT", _SORT_CODE_AND_ACCOUNT),
        _Detector("DATE_OF_BIRTH", personal.DATE_OF_BIRTH, personal.is_plausible_date, "value"),
        _Detector("PERSON", personal.TITLED_NAME, personal.is_name, "value", _any_tail, None),
        _Detector("PERSON", personal.TWO_WORD_TITLED_NAME, personal.is_full_name, "value", _any_tail, None),
        _Detector("PERSON", personal.LABELLED_NAME, personal.is_name, "value", _any_tail, None),
        _Detector("PERSON", personal.NAME_FIELD, personal.is_name, "value", _any_tail, None),
        _Detector("PERSON", personal.PARTY_NAME, personal.is_full_name, "value", _any_tail, None),
        _Detector("PERSON", personal.FIRST_NAME_SURNAME, personal.is_full_name, "value", _any_tail, None),
        _Detector("PERSON", personal.CAPITALS_FIRST_NAME_SURNAME, personal.is_full_name, "value", _any_tail, None),
    ]


def _cuts(text: str, start: int, end: int, droppable: Callable[[str], bool]) -> Iterator[int]:
    """Where a candidate may end: its full length, then before each separator whose tail may be
    dropped, longest first."""
    yield end
    for index in range(end - 1, start, -1):
        if text[index] in _SEPARATORS and text[index - 1].isalnum() and droppable(text[index + 1 : end]):
            yield index


def _accepted_span(detector: _Detector, text: str, found: re.Match[str]) -> tuple[int, int] | None:
    start, end = found.span(detector.group)
    if detector.accept is None:
        return start, end
    for cut in _cuts(text, start, end, detector.droppable):
        if detector.accept(text[start:cut]):
            return start, cut
    return None


def _scan(detector: _Detector, text: str) -> Iterator[Match]:
    """Every accepted finding; after a rejected candidate the search resumes one character on,
    so a valid finding that starts inside the rejected one is not lost. Text without the
    detector's hint (a digit for numbers, "@" for e-mails) cannot match and is skipped."""
    if detector.hint is not None and detector.hint.search(text) is None:
        return
    position = 0
    while (found := detector.pattern.search(text, position)) is not None:
        span = _accepted_span(detector, text, found)
        if span is None:
            position = found.start() + 1
            continue
        yield Match(detector.kind, *span)
        position = max(span[1], found.start() + 1)


def _overlaps(match: Match, chosen: Iterable[Match]) -> bool:
    return any(match.start < other.end and other.start < match.end for other in chosen)


def _resolve(matches: Iterable[Match], rank: Mapping[str, int]) -> list[Match]:
    """Keep the longest findings (ties by kind rank) that do not overlap, in text order."""
    chosen: list[Match] = []
    for match in sorted(matches, key=lambda m: (m.start - m.end, rank[m.kind], m.start)):
        if not _overlaps(match, chosen):
            chosen.append(match)
    return sorted(chosen, key=lambda m: m.start)


def placeholder(kind: str) -> str:
    """What a finding of `kind` is replaced by: the kind in brackets, so readers know what was there."""
    return f"[{kind}]"


def _unique_key(key: str, taken: Mapping[str, Any]) -> str:
    """Two keys that redact to the same placeholder must not overwrite each other's values."""
    candidate, number = key, 1
    while candidate in taken:
        number += 1
        candidate = f"{key}#{number}"
    return candidate


def map_strings(value: Any, redact_text: Callable[[str], str], *, integers: bool = True) -> Any:
    """Apply `redact_text` to every string in a JSON-like value, mapping keys included.

    With `integers`, integers are checked through their decimal form (a card number stored as an
    int is still a card number). Floats, booleans and None pass unchanged; tuples come back as
    lists, as JSON would write them. The input is not modified.
    """
    if isinstance(value, str):
        return redact_text(value)
    if integers and isinstance(value, int) and not isinstance(value, bool):
        redacted = redact_text(str(value))
        return value if redacted == str(value) else redacted
    if isinstance(value, Mapping):
        result: dict[Any, Any] = {}
        for key, item in value.items():
            new_key = _unique_key(redact_text(key), result) if isinstance(key, str) else key
            result[new_key] = map_strings(item, redact_text, integers=integers)
        return result
    if isinstance(value, list | tuple):
        return [map_strings(item, redact_text, integers=integers) for item in value]
    return value


class Redactor:
    """Finds and replaces PII with typed placeholders such as `[IBAN]`.

    kinds: the built-in kinds to detect (a subset of `KINDS`; all by default).
    national_id_patterns: regexes for national ids beyond US SSNs and UK NI numbers (used when
        NATIONAL_ID is among `kinds`); they only match whole tokens.
    extra_patterns: more regexes per kind, e.g. {"EMPLOYEE_ID": [r"EMP-\\d{6}"]}; a new kind
        becomes its own placeholder. They only match whole tokens and are always active.
    """

    def __init__(
        self,
        kinds: Iterable[str] | None = None,
        *,
        national_id_patterns: Iterable[str | re.Pattern[str]] = GENERIC_NATIONAL_ID_PATTERNS,
        extra_patterns: Mapping[str, Iterable[str | re.Pattern[str]]] | None = None,
    ) -> None:
        self.kinds = frozenset(KINDS if kinds is None else kinds)
        unknown = self.kinds - set(KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        extra = dict(extra_patterns or {})
        for kind in extra:
            if not _KIND_NAME.fullmatch(kind):
                raise ValueError(f"PII kind {kind!r} must be an upper-case name such as EMPLOYEE_ID")
        self._detectors = [d for d in _builtin_detectors(national_id_patterns) if d.kind in self.kinds]
        self._detectors += [
            _Detector(kind, _bounded(pattern), hint=None) for kind, patterns in extra.items() for pattern in patterns
        ]
        ordered = [*KINDS, *(kind for kind in extra if kind not in KINDS)]
        self._rank = {kind: index for index, kind in enumerate(ordered)}
        self._redact_short = lru_cache(maxsize=SHORT_TEXT_CACHE)(self._redact)

    def find(self, text: str) -> list[Match]:
        """Non-overlapping findings in text order; a name found once is found wherever it recurs."""
        found = [m for detector in self._detectors for m in _scan(detector, text)]
        names = [(m.start, m.end) for m in found if m.kind == "PERSON"]
        found += [Match("PERSON", *span) for span in personal.name_echoes(text, names)]
        return _resolve(found, self._rank)

    def redact(self, text: str) -> str:
        """`text` with every finding replaced by its placeholder; everything else byte-identical.

        Short strings (explanation tokens and keys, which recur in every audit entry) are answered
        from a bounded cache.
        """
        return self._redact_short(text) if len(text) <= SHORT_TEXT_CHARS else self._redact(text)

    def _redact(self, text: str) -> str:
        pieces, position = [], 0
        for match in self.find(text):
            pieces += [text[position : match.start], placeholder(match.kind)]
            position = match.end
        pieces.append(text[position:])
        return "".join(pieces)

    def redact_record(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of a (nested) record with every string, key and integer redacted."""
        return map_strings(record, self.redact)


_DEFAULT = Redactor()


def find_pii(text: str) -> list[Match]:
    """Findings of every built-in kind, with the default national-id patterns."""
    return _DEFAULT.find(text)


def redact(text: str) -> str:
    """`text` with every built-in kind of PII replaced by its placeholder."""
    return _DEFAULT.redact(text)


def redact_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A redacted copy of a record of strings (nested mappings and lists too), for logging."""
    return _DEFAULT.redact_record(record)
