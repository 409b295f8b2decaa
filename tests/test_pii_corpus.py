"""No explanation token that is part of PII reaches the audit log (issue 24, finding 6).

A token is part of an entity when its characters overlap the entity's span in the input text.
The corpus has 15 kinds of entity, each in several formats, and is tokenised by the real MiniLM
tokenizer that the published models use, so the tokens are the word pieces a prediction explains
("##son", "192", ".", "168"). Ordinary financial text (amounts, percentages, tickers, years, Q3)
must keep every token: explanations are only useful if they are not over-masked.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from infer_fixtures import train_and_publish
from transformers import AutoTokenizer

from fingpt_federated.infer.explain import token_offsets
from fingpt_federated.infer.loading import open_model
from fingpt_federated.infer.predictor import Predictor
from fingpt_federated.infer.service import PredictionService
from fingpt_federated.model.backbone import minilm_path
from fingpt_federated.privacy.audit import AuditLog, read_audit_log

# (entity, placeholder kind, the entity as written, a sentence it appears in)
CORPUS = [
    ("person", "PERSON", "John Smith", "Mr {} disputes the EUR 89.99 charge"),
    ("person", "PERSON", "Catherine O'Brien-Walsh", "Dear Ms {}, your Q3 statement is ready"),
    ("person", "PERSON", "Jane Doe", "Account holder: {}, balance $1,250.50"),
    ("person", "PERSON", "José Álvarez", "Customer {} asked for a 25bp cut"),
    ("person", "PERSON", "Sarah Connor", "{} wired USD 10,000 on 2024-03-15"),
    ("person", "PERSON", "jane doe", "Name: {} (typed in lower case)"),
    ("person", "PERSON", "Müller", "Frau {} eröffnete ein Konto"),
    ("person", "PERSON", "JOHN DOE", "BENEFICIARY {} LONDON, ref INV-2024-0042"),
    ("date of birth", "DATE_OF_BIRTH", "12/04/1985", "Applicant DOB {} per the KYC form"),
    ("date of birth", "DATE_OF_BIRTH", "1985-04-12", "date of birth: {}, income GBP 45,000"),
    ("date of birth", "DATE_OF_BIRTH", "12 April 1985", "Customer born on {} in Leeds"),
    ("date of birth", "DATE_OF_BIRTH", "April 12, 1985", "Birth date {} confirmed for the Q3 review"),
    ("date of birth", "DATE_OF_BIRTH", "12.04.85", "geboren am {} in Köln"),
    ("IPv4 address", "IP_ADDRESS", "192.168.1.10", "Login from {} flagged by fraud ops at 14:30"),
    ("IPv4 address", "IP_ADDRESS", "203.0.113.7:8443", "API call from {}, 3 failed attempts"),
    ("IPv4 address", "IP_ADDRESS", "10.12.0.0/16", "Block {} after the $2.5m wire"),
    ("IPv6 address", "IP_ADDRESS", "2001:db8::8a2e:370:7334", "IPv6 client {} requested a statement"),
    ("IPv6 address", "IP_ADDRESS", "fe80::1ff:fe23:4567:890a", "Session {} opened at 09:30"),
    ("passport", "PASSPORT", "123456789", "Passport No. {} seen at onboarding on 2024-03-15"),
    ("passport", "PASSPORT", "C01X00T47", "Reisepassnummer: {} (Deutschland)"),
    ("passport", "PASSPORT", "12AB34567", "passeport n° {} du client"),
    ("passport", "PASSPORT", "J8369854", "passport (India) {} expires in 2026"),
    ("sort code", "ACCOUNT", "20-00-00", "Use sort code {} and the usual reference"),
    ("sort code", "ACCOUNT", "12-34-56 12345678", "Pay GBP 1,250.50 to {} by Friday"),
    ("sort code", "ACCOUNT", "40-47-84, 87654321", "New payee details: {} (Q3 rent)"),
    ("sort code", "ACCOUNT", "20 00 00 55779911", "Bank details {} (Barclays)"),
    ("account number", "ACCOUNT", "55779911", "Credit a/c {} with the EUR 3,200 proceeds"),
    ("account number", "ACCOUNT", "0012-3456-7890", "Acct #: {} is overdrawn by $1,250.50"),
    ("account number", "ACCOUNT", "87654321", "account number: {} (current account)"),
    ("IBAN", "IBAN", "DE89 3704 0044 0532 0130 00", "Please wire the EUR 25,000 settlement to {}."),
    ("IBAN", "IBAN", "GB29NWBK60161331926819", "My new IBAN is {}, please update"),
    ("IBAN", "IBAN", "NL91 ABNA 0417 1643 00", "Salary is paid into {} every month"),
    ("payment card", "CARD", "4111 1111 1111 1111", "Card {} was charged $1,250.50"),
    ("payment card", "CARD", "5555-5555-5555-4444", "Mastercard {} declined at 14:32"),
    ("payment card", "CARD", "371449635398431", "Amex card number {} appears in the complaint"),
    ("e-mail", "EMAIL", "jane.doe+statements@mail.bank.co.uk", "Send the Q3 pack to {}."),
    ("e-mail", "EMAIL", "First.Last@Example.COM", "Reply to <{}> with the signed form"),
    ("phone", "PHONE", "+44 20 7946 0958", "Call our London desk on {} before 17:00 GMT."),
    ("phone", "PHONE", "(212) 555-0187", "Client asked to be called back at {} re: margin call"),
    ("phone", "PHONE", "07700 900123", "Customer mobile {} updated"),
    ("US SSN", "NATIONAL_ID", "536-22-1234", "W-9 lists {} as the taxpayer id"),
    ("US SSN", "NATIONAL_ID", "536221234", "SSN: {} (verified)"),
    ("UK NI number", "NATIONAL_ID", "AB 12 34 56 C", "NI number {} on the payslip for March"),
    ("UK NI number", "NATIONAL_ID", "JG103759A", "UK NINO {} matched HMRC records"),
    ("other national id", "NATIONAL_ID", "RSSMRA85T10A562S", "Codice fiscale {} del cliente"),
    ("other national id", "NATIONAL_ID", "ABCPE1234F", "PAN {} linked to the demat account"),
    ("other national id", "NATIONAL_ID", "12345678Z", "DNI {} del titular"),
]

ORDINARY = [
    "$JPM beats: Q3 2024 EPS $4.37 vs $4.01 est., revenue $43.3bn, CET1 ratio 15.3%",
    "Fed cuts rates by 25bp to 4.75%-5.00%; 10-year Treasury yield falls 8bp to 3.62%",
    "AAPL closes at $227.52, up 1.2%, market cap $3.45tn",
    "Bought 10,000 shares of BRK.B at $410.20 at 14:30:05 EST on 2024-03-15",
    "EUR/USD 1.0850, GBP/USD 1.2710, USD/JPY 151.35 at 09:00 GMT",
    "H1 2025 guidance: revenue EUR 12.5-13.0bn, EBITDA margin 31%, FY2024 dividend EUR 0.90/share",
    "Credit Suisse AT1 bonds wiped out: CHF 16bn written down on 19 March 2023",
    "Account balances rose to $1,250.50 on average; 2.5m new accounts opened in 2023",
    "Moody's upgrades HSBC to Aa3 from A1; S&P keeps A+ / A-1, outlook stable",
    "Tesla $TSLA deliveries 386,810 in Q1 2024 vs 449,080 est.",
    "Customer deposits rose 3% in Q3; the Customer Service Team handled 10,000 calls",
    "Dr Copper rallies 2% as EPS Miss Estimates at 3 of 5 miners",
]

TOKENIZER = AutoTokenizer.from_pretrained(minilm_path())
MAX_LENGTH = 128


def _clock() -> datetime:
    return datetime(2000, 1, 1, tzinfo=UTC)


def _explained(text: str) -> dict:
    """Every token of `text` as the predictor explains it: piece, position, score and character span."""
    ids = TOKENIZER(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    spans = token_offsets(TOKENIZER, text, ids, MAX_LENGTH)
    assert spans is not None  # MiniLM's tokenizer is a fast one
    pieces = TOKENIZER.convert_ids_to_tokens(ids)
    tokens = [
        {"token": piece, "position": i, "score": 0.5, "start": start, "end": end}
        for i, (piece, (start, end)) in enumerate(zip(pieces, spans, strict=True))
        if end > start
    ]
    return {"method": "input_x_gradient", "tokens": tokens}


def _overlaps(token: dict, start: int, end: int) -> bool:
    return token["start"] < end and start < token["end"]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in [*_strings(key), *_strings(item)]]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def _written_strings(entry: dict) -> list[str]:
    """Every string (keys included) of an entry as read back from the log, placeholders cut out
    ("[EMAIL]" holds "mail"), but the time and hashes (digits and hex that may hold any piece by chance)."""
    strings = _strings({key: value for key, value in entry.items() if key not in ("input_hash", "model_hash", "time")})
    return [re.sub(r"\[[A-Z_]+\]", "", s).lower() for s in strings]


def _pieces(text: str, start: int, end: int) -> set[str]:
    """The entity's word pieces of 3 or more letters or digits, as a tokenizer writes them."""
    pieces = {t["token"].removeprefix("##") for t in _explained(text)["tokens"] if _overlaps(t, start, end)}
    return {piece for piece in pieces if len(re.sub(r"\W", "", piece)) >= 3}


def test_the_corpus_has_at_least_14_kinds_each_in_several_formats():
    kinds: dict[str, int] = {}
    for entity, _, _, _ in CORPUS:
        kinds[entity] = kinds.get(entity, 0) + 1
    assert len(kinds) >= 14 and min(kinds.values()) >= 2, kinds


@pytest.mark.parametrize(("entity", "kind", "value", "template"), CORPUS, ids=[f"{e}-{v}" for e, _, v, _ in CORPUS])
def test_every_token_overlapping_an_entity_is_masked_and_every_other_token_kept(
    tmp_path, entity, kind, value, template
):
    text = template.format(value)
    start = text.index(value)
    end = start + len(value)
    explanation = _explained(text)
    log = AuditLog(tmp_path / "audit.jsonl", clock=_clock)
    written = log.record("sha256:model", {"text": text}, {"label": "a", "probabilities": [1.0]}, explanation)
    for before, after in zip(explanation["tokens"], written["explanation"]["tokens"], strict=True):
        expected = f"[{kind}]" if _overlaps(before, start, end) else before["token"]
        assert after["token"] == expected, (before, after)
    (entry,) = read_audit_log(log.path)
    strings = _written_strings(entry)
    assert [piece for piece in _pieces(text, start, end) if any(piece in s for s in strings)] == []


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_financial_text_keeps_every_token(tmp_path, text):
    explanation = _explained(text)
    log = AuditLog(tmp_path / "audit.jsonl", clock=_clock)
    written = log.record("sha256:model", {"text": text}, {"label": "a", "probabilities": [1.0]}, explanation)
    assert written["explanation"] == explanation


def _record(tmp_path, text: str, explanation: dict) -> dict:
    log = AuditLog(tmp_path / "audit.jsonl", clock=_clock)
    return log.record("sha256:model", {"text": text}, {"label": "a", "probabilities": [1.0]}, explanation)


def test_a_piece_outside_the_entity_is_kept_while_the_same_piece_inside_it_is_masked(tmp_path):
    text = "Q3 2024 revenue up 12%; client DOB 12/04/2024 per KYC"
    written = [t["token"] for t in _record(tmp_path, text, _explained(text))["explanation"]["tokens"]]
    assert written[:4] == ["q", "##3", "202", "##4"]
    assert written.count("202") == 1 and written.count("[DATE_OF_BIRTH]") == 6


def test_tokens_without_offsets_are_masked_when_they_could_be_a_piece_of_the_entity(tmp_path):
    text = "Sort code 12-34-56, login from 10.0.0.7 by Mr Jan Kowalski in Q3 2024"
    pieces = ["12", "-", "34", ".", "7", "kowal", "##ski", "q3", "2024", "login"]
    explanation = {"tokens": [{"token": piece, "score": 0.1} for piece in pieces]}
    written = [t["token"] for t in _record(tmp_path, text, explanation)["explanation"]["tokens"]]
    masked = ["[ACCOUNT]", "[ACCOUNT]", "[ACCOUNT]", "[IP_ADDRESS]", "[IP_ADDRESS]", "[PERSON]", "[PERSON]"]
    assert written == [*masked, "q3", "2024", "login"]


def test_offsets_that_do_not_fit_the_text_fall_back_to_the_piece_rule(tmp_path):
    text = "Mr John Smith bought 2024 shares"
    start = text.index("Smith")
    wrong_place = {"token": "smith", "start": 0, "end": 5, "score": 0.1}  # claims to be "Mr Jo"
    beyond = {"token": "john", "start": start, "end": len(text) + 4, "score": 0.1}
    right = {"token": "2024", "start": text.index("2024"), "end": text.index("2024") + 4, "score": 0.1}
    written = _record(tmp_path, text, {"tokens": [wrong_place, beyond, right]})["explanation"]["tokens"]
    assert [t["token"] for t in written] == ["[PERSON]", "[PERSON]", "2024"]


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_setting):
    """The tiny published model explaining every token (top_k beyond its 32-token window), audited."""
    root = tmp_path_factory.mktemp("pii")
    published, card = open_model(train_and_publish(root, ["fp32"]), "fp32")
    return PredictionService(Predictor(published, top_k=64), card, AuditLog(root / "audit.jsonl"), cache_size=0)


@pytest.mark.slow
def test_real_predictions_write_no_piece_of_any_entity_to_the_audit_log(service):
    series = [[101.5, 2000.0], [99.0, 1800.0], [97.25, 2500.0]]
    records = [{"text": template.format(value), "series": series} for _, _, value, template in CORPUS]
    results = service.predict_records(records)
    entries = read_audit_log(service.audit.path)
    assert len(entries) == len(CORPUS) == len(results)
    for (entity, kind, value, template), entry in zip(CORPUS, entries, strict=True):
        text = template.format(value)
        start, end = text.index(value), text.index(value) + len(value)
        tokens = entry["explanation"]["tokens"]
        assert tokens and all("start" in t and "end" in t for t in tokens), entity
        inside = [t for t in tokens if _overlaps(t, start, end)]
        assert inside and {t["token"] for t in inside} == {f"[{kind}]"}, (entity, value, inside)
        assert [t for t in tokens if t not in inside and re.fullmatch(r"\[[A-Z_]+\]", t["token"])] == [], entity
        strings = _written_strings(entry)
        assert [piece for piece in _pieces(text, start, end) if any(piece in s for s in strings)] == [], value
