"""Deterministic synthetic bank federations, so that demos and tests run without real data.

Three tasks, each generated bank by bank:

* ``news``: financial news sentences labelled bearish / bullish / neutral;
  ``news_plain`` is the same records (same banks, labels and topics) phrased plainly: no negations,
  hedges or asides, no label noise; a task a tiny model learns (fingpt-audit's backdoor federation);
* ``credit``: credit applications with a 6-month repayment history and a default label;
* ``transactions``: accounts labelled for money laundering plus their transfer stream.

The federation is non-IID by construction: every bank follows a :class:`BankProfile` (retail,
corporate, regional, investment, wealth, credit union, cycled when there are more banks) that
sets its label priors, topic and vocabulary mix, customer mix and size.

Determinism: bank ``i`` of task ``t`` draws only from ``default_rng([seed, t, i])``, so the same
arguments always give byte-identical CSV files and the global NumPy RNG is never touched.

Transfer ids: federation accounts are numbered ``0 .. total-1`` across banks. Counterparties
outside the federation use large ids: cash desks ``900_000_000 + bank index``, domestic external
parties from ``1_000_000_000`` and foreign (offshore) parties from ``2_000_000_000``; a transfer
is ``cross_border`` exactly when one side is foreign.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

SENTIMENTS = ("bearish", "bullish", "neutral")
EDUCATION = ("graduate", "university", "high_school", "other")
TASKS = ("news", "credit", "transactions", "news_plain")
TYPOLOGIES = ("structuring", "fan_in", "cycle", "pass_through")

CASH_DESK_BASE = 900_000_000
DOMESTIC_BASE = 1_000_000_000
FOREIGN_BASE = 2_000_000_000
REPORTING_THRESHOLD = 10_000.0
HORIZON_STEPS = 90  # one step is one day

_T = TypeVar("_T")
_TASK_STREAM = {task: number for number, task in enumerate(TASKS, start=1)} | {"news_plain": 1}  # the news records
_BULLISH, _NEUTRAL = SENTIMENTS.index("bullish"), SENTIMENTS.index("neutral")


@dataclass(frozen=True)
class BankProfile:
    """What makes one kind of bank's data differ from another's."""

    name: str
    size: float  # relative quantity of data; the six profiles average 1.0
    sentiment: tuple[float, float, float]  # prior of bearish, bullish, neutral news
    topics: dict[str, float]  # weight of each news topic
    tickers: tuple[str, ...]  # companies the bank's news is mostly about
    mean_age: float
    education: tuple[float, float, float, float]  # in the order of EDUCATION
    median_limit: float
    default_rate: float
    business_share: float
    laundering_rate: float
    typologies: tuple[float, float, float, float]  # in the order of TYPOLOGIES
    remittance_rate: float  # share of ordinary customers who send money abroad
    wealth: float  # scales salaries and balances
    activity: float  # scales card and customer payment counts


PROFILES: tuple[BankProfile, ...] = (
    BankProfile(
        name="retail",
        size=1.6,
        sentiment=(0.30, 0.30, 0.40),
        topics={
            "earnings": 0.15,
            "credit": 0.15,
            "capital": 0.05,
            "trading": 0.05,
            "consumer": 0.35,
            "deals": 0.05,
            "rates": 0.15,
            "bonds": 0.05,
        },
        tickers=("BAC", "WFC", "C", "COF", "AXP", "AAPL", "AMZN"),
        mean_age=38,
        education=(0.20, 0.40, 0.30, 0.10),
        median_limit=50_000,
        default_rate=0.22,
        business_share=0.10,
        laundering_rate=0.05,
        typologies=(0.50, 0.20, 0.10, 0.20),
        remittance_rate=0.06,
        wealth=1.0,
        activity=1.3,
    ),
    BankProfile(
        name="corporate",
        size=1.2,
        sentiment=(0.25, 0.45, 0.30),
        topics={
            "earnings": 0.25,
            "credit": 0.15,
            "capital": 0.10,
            "trading": 0.05,
            "consumer": 0.0,
            "deals": 0.30,
            "rates": 0.05,
            "bonds": 0.10,
        },
        tickers=("JPM", "CAT", "GE", "BA", "XOM", "MSFT"),
        mean_age=45,
        education=(0.40, 0.40, 0.15, 0.05),
        median_limit=200_000,
        default_rate=0.10,
        business_share=0.60,
        laundering_rate=0.08,
        typologies=(0.10, 0.40, 0.35, 0.15),
        remittance_rate=0.10,
        wealth=1.2,
        activity=0.9,
    ),
    BankProfile(
        name="regional",
        size=0.8,
        sentiment=(0.40, 0.25, 0.35),
        topics={
            "earnings": 0.10,
            "credit": 0.30,
            "capital": 0.25,
            "trading": 0.0,
            "consumer": 0.15,
            "deals": 0.05,
            "rates": 0.10,
            "bonds": 0.05,
        },
        tickers=("USB", "PNC", "TFC", "KEY", "RF"),
        mean_age=47,
        education=(0.10, 0.30, 0.45, 0.15),
        median_limit=40_000,
        default_rate=0.18,
        business_share=0.25,
        laundering_rate=0.04,
        typologies=(0.40, 0.30, 0.10, 0.20),
        remittance_rate=0.03,
        wealth=0.9,
        activity=1.0,
    ),
    BankProfile(
        name="investment",
        size=1.0,
        sentiment=(0.50, 0.25, 0.25),
        topics={
            "earnings": 0.20,
            "credit": 0.10,
            "capital": 0.10,
            "trading": 0.35,
            "consumer": 0.0,
            "deals": 0.10,
            "rates": 0.05,
            "bonds": 0.10,
        },
        tickers=("GS", "MS", "JPM", "NVDA"),
        mean_age=40,
        education=(0.50, 0.35, 0.10, 0.05),
        median_limit=150_000,
        default_rate=0.12,
        business_share=0.40,
        laundering_rate=0.09,
        typologies=(0.05, 0.20, 0.30, 0.45),
        remittance_rate=0.15,
        wealth=1.5,
        activity=0.7,
    ),
    BankProfile(
        name="wealth",
        size=0.5,
        sentiment=(0.20, 0.55, 0.25),
        topics={
            "earnings": 0.25,
            "credit": 0.05,
            "capital": 0.05,
            "trading": 0.30,
            "consumer": 0.0,
            "deals": 0.05,
            "rates": 0.10,
            "bonds": 0.20,
        },
        tickers=("SCHW", "BLK", "NTRS", "STT", "AAPL", "MSFT", "NVDA"),
        mean_age=56,
        education=(0.55, 0.35, 0.07, 0.03),
        median_limit=400_000,
        default_rate=0.05,
        business_share=0.15,
        laundering_rate=0.12,
        typologies=(0.05, 0.10, 0.25, 0.60),
        remittance_rate=0.25,
        wealth=4.0,
        activity=0.6,
    ),
    BankProfile(
        name="credit_union",
        size=0.9,
        sentiment=(0.30, 0.20, 0.50),
        topics={
            "earnings": 0.05,
            "credit": 0.25,
            "capital": 0.05,
            "trading": 0.0,
            "consumer": 0.40,
            "deals": 0.0,
            "rates": 0.20,
            "bonds": 0.05,
        },
        tickers=("ALLY", "SYF", "COF", "WFC"),
        mean_age=34,
        education=(0.05, 0.25, 0.50, 0.20),
        median_limit=20_000,
        default_rate=0.32,
        business_share=0.05,
        laundering_rate=0.03,
        typologies=(0.60, 0.25, 0.05, 0.10),
        remittance_rate=0.04,
        wealth=0.8,
        activity=1.1,
    ),
)


def bank_profile(index: int) -> BankProfile:
    """Profile of bank ``index``; profiles repeat when there are more banks than profiles."""
    return PROFILES[index % len(PROFILES)]


def bank_name(index: int) -> str:
    """Name such as ``bank_00_retail``."""
    return f"bank_{index:02d}_{bank_profile(index).name}"


def bank_sizes(num_banks: int, mean_rows: int) -> list[int]:
    """Rows per bank: ``mean_rows`` on average, scaled by each profile's size (quantity skew)."""
    factors = np.array([bank_profile(i).size for i in range(num_banks)])
    sizes = np.rint(factors / factors.mean() * mean_rows)
    return [max(1, int(size)) for size in sizes]


def _check_args(num_banks: int, rows: int, seed: int) -> None:
    if num_banks < 1:
        raise ValueError(f"num_banks must be at least 1, got {num_banks}")
    if rows < 1:
        raise ValueError(f"rows per bank must be at least 1, got {rows}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")


def _bank_rng(seed: int, task: str, bank: int) -> np.random.Generator:
    return np.random.default_rng([seed, _TASK_STREAM[task], bank])


def _pick(options: Sequence[_T], u: float) -> _T:
    """Element of ``options`` selected by a uniform number ``u`` in [0, 1)."""
    return options[int(u * len(options))]


# --------------------------------------------------------------------------- news


@dataclass(frozen=True)
class _Event:
    """Something that can go well or badly: (infinitive, past tense) for each direction."""

    good: tuple[str, str]
    bad: tuple[str, str]


@dataclass(frozen=True)
class _Topic:
    events: tuple[_Event, ...]
    neutral: tuple[str, ...]  # past-tense predicates that carry no direction
    subjects: tuple[str, ...] = ()  # empty: the companies of the bank's profile


def _same(phrase: str) -> tuple[str, str]:
    return phrase, phrase


_TOPICS: dict[str, _Topic] = {
    "earnings": _Topic(
        (
            _Event(
                _same("beat EPS estimates by {cents} cents"),
                ("miss EPS estimates by {cents} cents", "missed EPS estimates by {cents} cents"),
            ),
            _Event(("raise full-year guidance", "raised full-year guidance"), _same("cut full-year guidance")),
            _Event(
                ("grow net interest income {pct}%", "grew net interest income {pct}%"),
                ("report a {pct}% drop in net interest income", "reported a {pct}% drop in net interest income"),
            ),
            _Event(
                ("deliver record fee revenue", "delivered record fee revenue"),
                ("post a surprise quarterly loss", "posted a surprise quarterly loss"),
            ),
            _Event(
                ("lift its dividend by {pct}%", "lifted its dividend by {pct}%"),
                ("suspend its dividend", "suspended its dividend"),
            ),
        ),
        (
            "reported {quarter} EPS in line with consensus",
            "reaffirmed its full-year guidance",
            "scheduled its {quarter} earnings call for {weekday}",
            "kept its dividend unchanged at {cents} cents a share",
            "filed its quarterly report with the SEC",
        ),
    ),
    "credit": _Topic(
        (
            _Event(
                ("see its CDS spreads tighten {bp} basis points", "saw its CDS spreads tighten {bp} basis points"),
                ("see its CDS spreads widen {bp} basis points", "saw its CDS spreads widen {bp} basis points"),
            ),
            _Event(
                ("win an upgrade to {rating} from {agency}", "won an upgrade to {rating} from {agency}"),
                ("suffer a downgrade to {rating} from {agency}", "suffered a downgrade to {rating} from {agency}"),
            ),
            _Event(
                _same("cut its NPL ratio to {npl}%"),
                ("report its NPL ratio rising to {npl}%", "reported its NPL ratio rising to {npl}%"),
            ),
            _Event(
                ("release loan loss reserves", "released loan loss reserves"),
                ("build loan loss provisions sharply", "built loan loss provisions sharply"),
            ),
        ),
        (
            "kept its NPL ratio steady at {npl}%",
            "had its {rating} rating affirmed by {agency}",
            "left loan loss provisions broadly unchanged",
            "saw its CDS spreads little changed near {bp} basis points",
        ),
    ),
    "capital": _Topic(
        (
            _Event(
                ("lift its Tier 1 capital ratio to {tier1}%", "lifted its Tier 1 capital ratio to {tier1}%"),
                ("see its Tier 1 capital ratio drop to {tier1}%", "saw its Tier 1 capital ratio drop to {tier1}%"),
            ),
            _Event(
                ("pass the stress test comfortably", "passed the stress test comfortably"),
                ("fail the regulator's stress test", "failed the regulator's stress test"),
            ),
            _Event(
                ("announce a ${bn}bn share buyback", "announced a ${bn}bn share buyback"),
                ("launch a dilutive ${bn}bn equity raise", "launched a dilutive ${bn}bn equity raise"),
            ),
            _Event(
                ("exit its regulatory consent order", "exited its regulatory consent order"),
                ("face a ${bn}bn regulatory fine", "faced a ${bn}bn regulatory fine"),
            ),
        ),
        (
            "maintained its Tier 1 capital ratio at {tier1}%",
            "submitted its capital plan to regulators",
            "said its stress test results are due on {weekday}",
        ),
    ),
    "trading": _Topic(
        (
            _Event(
                ("rally {pct}% in early trading", "rallied {pct}% in early trading"),
                ("slump {pct}% in early trading", "slumped {pct}% in early trading"),
            ),
            _Event(_same("hit a 52-week high"), _same("hit a 52-week low")),
            _Event(
                ("see its trading VaR fall on calmer markets", "saw its trading VaR fall on calmer markets"),
                ("breach its VaR limit twice this quarter", "breached its VaR limit twice this quarter"),
            ),
            _Event(
                ("attract ${bn}bn of net inflows", "attracted ${bn}bn of net inflows"),
                ("suffer ${bn}bn of client outflows", "suffered ${bn}bn of client outflows"),
            ),
        ),
        (
            "traded flat ahead of its {quarter} results",
            "kept its average daily VaR unchanged",
            "saw volumes in line with the sector",
            "was added to a sector ETF rebalance",
        ),
    ),
    "consumer": _Topic(
        (
            _Event(
                ("grow deposits {pct}% quarter on quarter", "grew deposits {pct}% quarter on quarter"),
                ("lose {pct}% of deposits in a quarter", "lost {pct}% of deposits in a quarter"),
            ),
            _Event(
                ("see card charge-offs decline", "saw card charge-offs decline"),
                ("see card charge-offs spike", "saw card charge-offs spike"),
            ),
            _Event(
                ("expand its mortgage book", "expanded its mortgage book"),
                ("shrink its mortgage book as demand dried up", "shrank its mortgage book as demand dried up"),
            ),
        ),
        (
            "launched a new cashback card",
            "kept its savings rate at {npl}%",
            "opened {cents} new branches",
            "reported card spending in line with last year",
        ),
    ),
    "deals": _Topic(
        (
            _Event(
                ("win regulatory approval for its merger", "won regulatory approval for its merger"),
                ("abandon its merger after regulatory pushback", "abandoned its merger after regulatory pushback"),
            ),
            _Event(
                ("close an accretive ${bn}bn acquisition", "closed an accretive ${bn}bn acquisition"),
                ("take a ${bn}bn writedown on an acquisition", "took a ${bn}bn writedown on an acquisition"),
            ),
            _Event(
                ("land a record advisory mandate", "landed a record advisory mandate"),
                ("lose its lead role on a ${bn}bn bond deal", "lost its lead role on a ${bn}bn bond deal"),
            ),
        ),
        ("hired advisers to review its options", "confirmed talks about a ${bn}bn deal", "named a new head of M&A"),
    ),
    "rates": _Topic(
        (
            _Event(
                _same("cut rates by {bp} basis points"),
                ("hike rates by {bp} basis points", "hiked rates by {bp} basis points"),
            ),
            _Event(
                ("signal rate cuts later this year", "signaled rate cuts later this year"),
                ("signal higher-for-longer rates", "signaled higher-for-longer rates"),
            ),
            _Event(
                ("ease liquidity rules for lenders", "eased liquidity rules for lenders"),
                ("tighten capital rules for lenders", "tightened capital rules for lenders"),
            ),
        ),
        (
            "held rates steady, as expected",
            "left its policy guidance unchanged",
            "published minutes in line with expectations",
            "kept its balance sheet plan on hold",
        ),
        ("the Fed", "the ECB", "the Bank of England", "the FOMC"),
    ),
    "bonds": _Topic(
        (
            _Event(
                ("see the yield curve steepen", "saw the yield curve steepen {bp} basis points"),
                ("see the yield curve invert further", "saw the yield curve invert further"),
            ),
            _Event(
                ("see credit spreads tighten", "saw credit spreads tighten {bp} basis points"),
                ("see credit spreads blow out", "saw credit spreads widen {bp} basis points"),
            ),
            _Event(
                ("price in a soft landing", "priced in a soft landing"),
                ("price in a recession", "priced in a recession"),
            ),
        ),
        (
            "traded flat with 10-year yields at {yld}%",
            "saw the yield curve little changed",
            "held steady ahead of the payrolls report",
            "saw thin volumes before the holiday",
        ),
        ("Treasury markets", "the bond market", "credit markets", "the swaps market"),
    ),
}
_TOPIC_NAMES = tuple(_TOPICS)

_COMPANIES = {
    "JPM": "JPMorgan",
    "GS": "Goldman Sachs",
    "MS": "Morgan Stanley",
    "BAC": "Bank of America",
    "C": "Citigroup",
    "WFC": "Wells Fargo",
    "USB": "U.S. Bancorp",
    "PNC": "PNC Financial",
    "TFC": "Truist",
    "KEY": "KeyCorp",
    "RF": "Regions Financial",
    "SCHW": "Charles Schwab",
    "BLK": "BlackRock",
    "NTRS": "Northern Trust",
    "STT": "State Street",
    "COF": "Capital One",
    "AXP": "American Express",
    "SYF": "Synchrony",
    "ALLY": "Ally Financial",
    "AAPL": "Apple",
    "MSFT": "Microsoft",
    "NVDA": "Nvidia",
    "AMZN": "Amazon",
    "CAT": "Caterpillar",
    "GE": "GE Aerospace",
    "BA": "Boeing",
    "XOM": "Exxon Mobil",
}
_ALL_TICKERS = tuple(_COMPANIES)

_HEDGES = (
    "analysts are split on whether {s} will {v}",
    "it is unclear whether {s} can {v}",
    "traders debate if {s} could {v}",
    "investors wait to see if {s} will {v}",
    "{s} may {v} next quarter",
)
_DENIALS = ("{s} did not {v}", "contrary to fears, {s} did not {v}", "{s} managed not to {v}")
_FAILURES = ("{s} failed to {v}", "{s} did not {v}", "{s} could not {v}")
_LEADS = ("", "", "", "Breaking: ", "Update: ", "{quarter} update: ", "Market wrap: ")
_TAILS = (
    "",
    "",
    "",
    ", according to Reuters",
    ", Bloomberg reported",
    " on {weekday}",
    " in pre-market trading",
    ", a filing showed",
    ", analysts at {broker} said",
)
_ASIDES_AGAINST_GOOD = (
    ", despite fears of a downgrade",
    ", even as sector CDS spreads widened",
    ", shrugging off recession worries",
    ", despite a flattening yield curve",
)
_ASIDES_AGAINST_BAD = (
    ", even as peers rallied",
    ", despite an upbeat sector outlook",
    ", although analysts had expected an EPS beat",
    ", even as Treasury yields eased",
)
_RATINGS = ("AA-", "A+", "A", "A-", "BBB+", "BBB", "BBB-", "BB+")
_AGENCIES = ("Moody's", "S&P", "Fitch")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
_BROKERS = ("Barclays", "UBS", "Jefferies", "Deutsche Bank", "BNP Paribas")


@dataclass(frozen=True)
class NewsStyle:
    """How hard the news is to read: the shares of the sentences that need more than their words."""

    label_noise: float  # share of news labels replaced by another label
    negated: float  # share of directional news phrased as a negation
    hedged: float  # share of neutral news that hedges about a directional event
    aside: float  # share of directional news with an aside pointing the other way


NEWS_STYLES = {"news": NewsStyle(0.07, 0.25, 0.45, 0.2), "news_plain": NewsStyle(0.0, 0.0, 0.0, 0.0)}


def _slot_values(rng: np.random.Generator, n: int) -> list[dict[str, object]]:
    """Numbers and names that fill the ``{placeholders}`` of ``n`` sentences."""
    columns = {
        "bp": rng.integers(5, 120, n),
        "pct": np.round(rng.uniform(0.5, 15.0, n), 1),
        "npl": np.round(rng.uniform(0.4, 6.5, n), 1),
        "tier1": np.round(rng.uniform(9.0, 17.0, n), 1),
        "cents": rng.integers(2, 45, n),
        "bn": np.round(rng.uniform(0.2, 12.0, n), 1),
        "yld": np.round(rng.uniform(2.8, 5.2, n), 2),
        "rating": np.array(_RATINGS)[rng.integers(0, len(_RATINGS), n)],
        "agency": np.array(_AGENCIES)[rng.integers(0, len(_AGENCIES), n)],
        "quarter": np.array(["Q1", "Q2", "Q3", "Q4"])[rng.integers(0, 4, n)],
        "weekday": np.array(_WEEKDAYS)[rng.integers(0, len(_WEEKDAYS), n)],
        "broker": np.array(_BROKERS)[rng.integers(0, len(_BROKERS), n)],
    }
    return [{key: values[i] for key, values in columns.items()} for i in range(n)]


def _subject(topic: _Topic, tickers: tuple[str, ...], u: np.ndarray) -> str:
    """Who the sentence is about: a macro actor, or a company as ticker, name or both."""
    if topic.subjects:
        return _pick(topic.subjects, u[0])
    ticker = _pick(tickers if u[1] < 0.75 else _ALL_TICKERS, u[2])
    return _pick((f"${ticker}", _COMPANIES[ticker], f"{_COMPANIES[ticker]} (${ticker})"), u[3])


def _clause(label: int, topic: _Topic, subject: str, u: np.ndarray, style: NewsStyle) -> str:
    """Main clause whose true sentiment is ``label``, plainly stated, negated or hedged."""
    event = _pick(topic.events, u[0])
    if label == _NEUTRAL:
        if u[1] >= style.hedged:
            return f"{subject} {_pick(topic.neutral, u[2])}"
        verb = (event.good if u[3] < 0.5 else event.bad)[0]
        return _pick(_HEDGES, u[2]).format(s=subject, v=verb)
    good = label == _BULLISH
    if u[1] >= style.negated:
        return f"{subject} {(event.good if good else event.bad)[1]}"
    templates = _DENIALS if good else _FAILURES
    return _pick(templates, u[2]).format(s=subject, v=(event.bad if good else event.good)[0])


def _tail(label: int, u: np.ndarray, style: NewsStyle) -> str:
    if label != _NEUTRAL and u[0] < style.aside:
        return _pick(_ASIDES_AGAINST_GOOD if label == _BULLISH else _ASIDES_AGAINST_BAD, u[1])
    return _pick(_TAILS, u[1])


def _sentence(
    label: int, topic: _Topic, tickers: tuple[str, ...], u: np.ndarray, values: dict[str, object], style: NewsStyle
) -> str:
    subject = _subject(topic, tickers, u[0:4])
    text = _pick(_LEADS, u[4]) + _clause(label, topic, subject, u[5:9], style) + _tail(label, u[9:11], style)
    text = text.format(**values) + "."
    return text[0].upper() + text[1:]


def _noisy(labels: np.ndarray, rng: np.random.Generator, rate: float) -> np.ndarray:
    """Replace a ``rate`` share of labels in 0..2 by one of the two other labels."""
    flip = rng.random(len(labels)) < rate
    return np.where(flip, (labels + rng.integers(1, 3, len(labels))) % 3, labels)


def _bank_news(index: int, n: int, rng: np.random.Generator, style: NewsStyle) -> pd.DataFrame:
    profile = bank_profile(index)
    weights = np.array([profile.topics[name] for name in _TOPIC_NAMES])
    labels = rng.choice(3, size=n, p=profile.sentiment)
    topics = rng.choice(len(_TOPIC_NAMES), size=n, p=weights / weights.sum())
    uniforms = rng.random((n, 11))
    values = _slot_values(rng, n)
    texts = [
        _sentence(labels[i], _TOPICS[_TOPIC_NAMES[topics[i]]], profile.tickers, uniforms[i], values[i], style)
        for i in range(n)
    ]
    sentiment = np.array(SENTIMENTS)[_noisy(labels, rng, style.label_noise)]
    return pd.DataFrame({"text": texts, "sentiment": sentiment, "bank": bank_name(index)})


def generate_news(num_banks: int, rows_per_bank: int, seed: int, style: str = "news") -> pd.DataFrame:
    """Financial news sentences: columns ``text``, ``sentiment``, ``bank``; `style`: ``news`` or
    ``news_plain`` (NEWS_STYLES)."""
    _check_args(num_banks, rows_per_bank, seed)
    sizes = bank_sizes(num_banks, rows_per_bank)
    frames = [_bank_news(i, n, _bank_rng(seed, "news", i), NEWS_STYLES[style]) for i, n in enumerate(sizes)]
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------- credit

_EDU_LIMIT_EFFECT = np.array([0.35, 0.10, -0.20, -0.30])  # log credit limit, by EDUCATION
_EDU_RISK_EFFECT = np.array([-0.35, 0.0, 0.25, 0.35])  # latent risk, by EDUCATION
_REFERENCE_DEFAULT_RATE = 0.2  # a bank with this default rate has no latent risk shift
_DEFAULT_SCORE_NOISE = 0.9  # risk the repayment history does not reveal


def _demographics(profile: BankProfile, n: int, rng: np.random.Generator) -> pd.DataFrame:
    age = np.clip(np.rint(rng.normal(profile.mean_age, 11.0, n)), 21, 79).astype(np.int64)
    education = rng.choice(len(EDUCATION), size=n, p=profile.education)
    married_p = np.clip((age - 22) / 40.0, 0.05, 0.8)
    draw = rng.random(n)
    marital = np.where(draw < married_p, "married", np.where(draw < married_p + 0.06, "other", "single"))
    log_limit = (
        np.log(profile.median_limit) + _EDU_LIMIT_EFFECT[education] + 0.01 * (age - 40) + rng.normal(0.0, 0.5, n)
    )
    limit = np.maximum(1000, np.rint(np.exp(log_limit) / 1000) * 1000).astype(np.int64)
    return pd.DataFrame(
        {
            "age": age,
            "sex": np.where(rng.random(n) < 0.55, "female", "male"),
            "education": np.array(EDUCATION)[education],
            "marital": marital,
            "credit_limit": limit,
        }
    )


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def _latent_risk(profile: BankProfile, people: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """Credit risk (higher is worse): bank prior + demographics + personal noise.

    The bank shift makes riskier banks' customers also *look* riskier in their repayment
    history, not only default more often.
    """
    bank_shift = 0.6 * (_logit(profile.default_rate) - _logit(_REFERENCE_DEFAULT_RATE))
    education = _EDU_RISK_EFFECT[people["education"].map(EDUCATION.index).to_numpy()]
    young = (people["age"] < 30).to_numpy(dtype=float)
    single = (people["marital"] == "single").to_numpy(dtype=float)
    return bank_shift + education + 0.3 * young + 0.1 * single + rng.normal(0.0, 1.0, len(people))


def _monthly_trouble(risk: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Month-by-month payment trouble, shape (n, 6): risk + AR(1) shocks + personal trend."""
    n = len(risk)
    trend = rng.normal(0.0, 0.12, n)
    shock = rng.normal(0.0, 0.7, n)
    months = []
    for month in range(6):
        months.append(risk + shock + trend * (month - 2.5))
        shock = 0.6 * shock + rng.normal(0.0, 0.55, n)
    return np.stack(months, axis=1)


def _statuses(trouble: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Repayment status codes: -2 no use, -1 paid in full, 0 revolving, 1..8 months late."""
    late = np.clip(np.floor((trouble - 0.9) / 0.55).astype(np.int64) + 1, 1, 8)
    status = np.where(trouble > 0.9, late, 0)
    status = np.where(trouble < -0.4, -1, status)
    idle = (trouble < -1.3) & (rng.random(trouble.shape) < 0.5)
    return np.where(idle, -2, status)


def _bills_and_payments(
    limit: np.ndarray, trouble: np.ndarray, status: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    usage = 1 / (1 + np.exp(-(0.9 * trouble - 0.3 + rng.normal(0.0, 0.6, trouble.shape))))
    bill = np.where(status == -2, 0.0, limit[:, None] * usage)
    share = np.select(
        [status <= -1, status == 0],
        [np.ones_like(bill), rng.uniform(0.04, 0.35, bill.shape)],
        default=rng.uniform(0.0, 0.05, bill.shape) * (rng.random(bill.shape) < 0.5),
    )
    return np.round(bill, 2), np.round(bill * share, 2)


def _defaults(profile: BankProfile, risk: np.ndarray, status: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exactly the bank's default rate, given to the highest noisy risk scores."""
    score = risk + 0.15 * status[:, -1] + rng.normal(0.0, _DEFAULT_SCORE_NOISE, len(risk))
    count = int(round(profile.default_rate * len(risk)))
    default = np.zeros(len(risk), dtype=np.int64)
    default[np.argsort(-score, kind="stable")[:count]] = 1
    return default


def _bank_credit(index: int, n: int, rng: np.random.Generator) -> pd.DataFrame:
    profile = bank_profile(index)
    people = _demographics(profile, n, rng)
    risk = _latent_risk(profile, people, rng)
    trouble = _monthly_trouble(risk, rng)
    status = _statuses(trouble, rng)
    bill, paid = _bills_and_payments(people["credit_limit"].to_numpy(), trouble, status, rng)
    columns: dict[str, object] = {"bank": bank_name(index)}
    columns.update(people.to_dict("series"))
    for prefix, matrix in (("status", status), ("bill", bill), ("paid", paid)):
        columns.update({f"{prefix}_{m + 1}": matrix[:, m] for m in range(6)})
    columns["default"] = _defaults(profile, risk, status, rng)
    return pd.DataFrame(columns)


def generate_credit(num_banks: int, rows_per_bank: int, seed: int) -> pd.DataFrame:
    """Credit applications with demographics, 6 months of repayment history and ``default``.

    Month 1 is the oldest and month 6 the newest.
    """
    _check_args(num_banks, rows_per_bank, seed)
    sizes = bank_sizes(num_banks, rows_per_bank)
    frames = [_bank_credit(i, n, _bank_rng(seed, "credit", i)) for i, n in enumerate(sizes)]
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------- transactions

_ArrayLike = np.ndarray | int | float | bool


class _Ledger:
    """Transfers collected as array chunks and concatenated once."""

    def __init__(self) -> None:
        self._chunks: list[tuple[np.ndarray, ...]] = []

    def add(
        self, source: _ArrayLike, target: _ArrayLike, amount: _ArrayLike, step: _ArrayLike, cross_border: _ArrayLike
    ) -> None:
        """Record transfers; scalars are broadcast against the arrays."""
        arrays = np.broadcast_arrays(source, target, amount, step, cross_border)
        self._chunks.append(tuple(np.atleast_1d(a) for a in arrays))

    def frame(self) -> pd.DataFrame:
        columns = [np.concatenate(parts) for parts in zip(*self._chunks, strict=True)]
        return pd.DataFrame(
            {
                "source": columns[0].astype(np.int64),
                "target": columns[1].astype(np.int64),
                "amount": np.round(columns[2].astype(float), 2),
                "step": np.clip(columns[3], 0, HORIZON_STEPS - 1).astype(np.int64),
                "cross_border": columns[4].astype(np.int64),
            }
        )


@dataclass
class _Bank:
    """One bank's accounts while its transfers are generated."""

    index: int
    profile: BankProfile
    rng: np.random.Generator
    ids: np.ndarray
    business: np.ndarray  # bool per account
    laundering: np.ndarray  # 0/1 per account
    schemes: list[tuple[str, np.ndarray]]  # typology and the account ids it involves

    @property
    def cash_desk(self) -> int:
        return CASH_DESK_BASE + self.index


def _external(rng: np.random.Generator, n: int, pool: int, foreign: bool | np.ndarray = False) -> np.ndarray:
    """Ids of parties outside the federation drawn from a pool of ``pool`` ids.

    ``foreign`` may be a bool or a mask of length ``n``.
    """
    base = np.where(foreign, FOREIGN_BASE, DOMESTIC_BASE)
    return base + rng.integers(0, pool, n)


def _plan_schemes(profile: BankProfile, ids: np.ndarray, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Laundering schemes: at least one in any bank with two accounts or more."""
    quota = min(len(ids) // 2, max(1, int(round(profile.laundering_rate * len(ids)))))
    members = rng.permutation(ids)[:quota]
    schemes, used = [], 0
    while used < quota:
        kind = TYPOLOGIES[rng.choice(len(TYPOLOGIES), p=profile.typologies)]
        size = int(rng.integers(3, 5)) if kind == "cycle" else 1
        if used + size > quota:
            kind, size = "pass_through", 1
        schemes.append((kind, members[used : used + size]))
        used += size
    return schemes


def _open_bank(index: int, first_id: int, n: int, rng: np.random.Generator) -> _Bank:
    profile = bank_profile(index)
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    business = rng.random(n) < profile.business_share
    schemes = _plan_schemes(profile, ids, rng)
    laundering = np.zeros(n, dtype=np.int64)
    for _, accounts in schemes:
        laundering[accounts - first_id] = 1
    return _Bank(index, profile, rng, ids, business, laundering, schemes)


def _accounts_frame(bank: _Bank) -> pd.DataFrame:
    median = np.where(bank.business, 40_000.0, 3_000.0) * bank.profile.wealth
    balance = bank.rng.lognormal(np.log(median), 0.9)
    return pd.DataFrame(
        {
            "account_id": bank.ids,
            "bank": bank_name(bank.index),
            "account_type": np.where(bank.business, "business", "personal"),
            "opening_balance": np.round(balance, 2),
            "laundering": bank.laundering,
        }
    )


def _salaries_and_rent(bank: _Bank, ledger: _Ledger) -> None:
    """Monthly salary into every personal account, rent out of most of them."""
    rng, people = bank.rng, bank.ids[~bank.business]
    n = len(people)
    employers = _external(rng, n, 3000)
    own_business = bank.ids[bank.business]
    if len(own_business):
        local = rng.random(n) < 0.35
        employers[local] = rng.choice(own_business, local.sum())
    salary = rng.lognormal(np.log(3200 * bank.profile.wealth), 0.45, n)
    payday = rng.integers(0, 5, n)
    renters = rng.random(n) < 0.7
    landlords = _external(rng, n, 10**8)
    for month in range(HORIZON_STEPS // 30):
        day = month * 30 + payday
        ledger.add(employers, people, salary * rng.normal(1.0, 0.02, n), day, 0)
        ledger.add(
            people[renters],
            landlords[renters],
            0.35 * salary[renters],
            day[renters] + rng.integers(1, 4, renters.sum()),
            0,
        )


def _card_payments(bank: _Bank, merchants: np.ndarray, ledger: _Ledger) -> None:
    """Shopping: small payments to merchants, some of them federation business accounts."""
    rng, people = bank.rng, bank.ids[~bank.business]
    payers = np.repeat(people, rng.poisson(12 * bank.profile.activity, len(people)))
    m = len(payers)
    abroad = rng.random(m) < 0.04
    targets = _external(rng, m, 5000, abroad)
    in_federation = (rng.random(m) < 0.4) & ~abroad & (len(merchants) > 0)
    targets[in_federation] = rng.choice(merchants, in_federation.sum())
    amounts = rng.lognormal(np.log(45.0), 0.9, m)
    ledger.add(payers, targets, amounts, rng.integers(0, HORIZON_STEPS, m), abroad)


def _business_flows(bank: _Bank, ledger: _Ledger) -> None:
    """Customer receipts (legitimate fan-in), supplier payments, cash takings."""
    rng, firms = bank.rng, bank.ids[bank.business]
    receivers = np.repeat(firms, 1 + rng.poisson(30 * bank.profile.activity, len(firms)))
    m = len(receivers)
    ledger.add(
        _external(rng, m, 10**8), receivers, rng.lognormal(np.log(180.0), 1.0, m), rng.integers(0, HORIZON_STEPS, m), 0
    )
    payers = np.repeat(firms, rng.poisson(8, len(firms)))
    m = len(payers)
    abroad = rng.random(m) < 0.15
    ledger.add(
        payers,
        _external(rng, m, 20_000, abroad),
        rng.lognormal(np.log(2500.0), 0.8, m),
        rng.integers(0, HORIZON_STEPS, m),
        abroad,
    )
    cash_heavy = firms[rng.random(len(firms)) < 0.2]
    depositors = np.repeat(cash_heavy, rng.poisson(6, len(cash_heavy)))
    m = len(depositors)
    ledger.add(bank.cash_desk, depositors, rng.lognormal(np.log(3000.0), 0.8, m), rng.integers(0, HORIZON_STEPS, m), 0)


def _innocent_oddities(bank: _Bank, ledger: _Ledger) -> None:
    """Ordinary customers who look a little suspicious: remittances, large cash deposits."""
    rng, people = bank.rng, bank.ids[~bank.business]
    senders = people[rng.random(len(people)) < bank.profile.remittance_rate]
    senders = np.repeat(senders, rng.integers(1, 4, len(senders)))
    m = len(senders)
    ledger.add(
        senders,
        _external(rng, m, 50_000, True),
        rng.lognormal(np.log(400.0), 0.7, m),
        rng.integers(0, HORIZON_STEPS, m),
        1,
    )
    sellers = people[rng.random(len(people)) < 0.03]
    sellers = np.repeat(sellers, rng.integers(1, 3, len(sellers)))
    m = len(sellers)
    ledger.add(bank.cash_desk, sellers, rng.uniform(8500.0, 9999.0, m), rng.integers(0, HORIZON_STEPS, m), 0)


def _large_transfers(bank: _Bank, ledger: _Ledger) -> None:
    """Big but innocent sums, so that amount size alone does not reveal laundering.

    Some customers receive a one-off sum (bonus, property sale) and spend much of it soon
    after, occasionally abroad; some businesses settle large contracts both ways.
    """
    rng = bank.rng
    scale = np.where(bank.business, 30_000.0, 25_000.0) * bank.profile.wealth
    lucky = rng.random(len(bank.ids)) < np.where(bank.business, 0.5, 0.15)
    ids, scale = bank.ids[lucky], scale[lucky]
    m = len(ids)
    amount = rng.lognormal(np.log(scale), 0.8)
    step = rng.integers(0, HORIZON_STEPS - 10, m)
    ledger.add(_external(rng, m, 10**8), ids, amount, step, 0)
    spends = rng.random(m) < 0.7
    abroad = rng.random(m) < 0.25
    ledger.add(
        ids[spends],
        _external(rng, m, 10**8, abroad)[spends],
        (amount * rng.uniform(0.3, 0.95, m))[spends],
        (step + rng.integers(1, 10, m))[spends],
        abroad[spends],
    )


def _structuring(bank: _Bank, accounts: np.ndarray, ledger: _Ledger) -> None:
    """Cash deposits just below the reporting threshold, then the sum moved on."""
    rng, account = bank.rng, accounts[0]
    k = int(rng.integers(3, 14))
    start = int(rng.integers(0, HORIZON_STEPS - 25))
    amounts = rng.uniform(0.9, 0.999, k) * REPORTING_THRESHOLD
    steps = start + np.sort(rng.integers(0, 20, k))
    ledger.add(bank.cash_desk, account, amounts, steps, 0)
    abroad = bool(rng.random() < 0.5)
    ledger.add(account, _external(rng, 1, 10**8, abroad), 0.9 * amounts.sum(), steps[-1] + 2, int(abroad))


def _fan_in(bank: _Bank, accounts: np.ndarray, ledger: _Ledger) -> None:
    """Many mule accounts pay into one collector, which forwards the total."""
    rng, account = bank.rng, accounts[0]
    k = int(rng.integers(8, 30))
    start = int(rng.integers(0, HORIZON_STEPS - 20))
    foreign_mules = rng.random(k) < 0.2
    amounts = rng.uniform(800.0, 4900.0, k)
    steps = start + rng.integers(0, 10, k)
    ledger.add(_external(rng, k, 10**8, foreign_mules), account, amounts, steps, foreign_mules)
    parts = int(rng.integers(1, 4))
    abroad = rng.random(parts) < 0.6
    ledger.add(
        account,
        _external(rng, parts, 10**8, abroad),
        0.95 * amounts.sum() / parts,
        start + 11 + np.arange(parts),
        abroad,
    )


def _cycle(bank: _Bank, accounts: np.ndarray, ledger: _Ledger) -> None:
    """Money that goes round A -> B -> C (-> D) -> A, shrinking by small fees each hop."""
    rng = bank.rng
    amount = rng.lognormal(np.log(30_000.0), 0.6)
    step = int(rng.integers(0, HORIZON_STEPS - 20))
    ledger.add(_external(rng, 1, 10**8), accounts[0], amount, step, 0)
    for _ in range(int(rng.integers(1, 4))):
        for source, target in zip(accounts, np.roll(accounts, -1), strict=True):
            amount *= rng.uniform(0.97, 0.995)
            step += int(rng.integers(0, 3))
            ledger.add(source, target, amount, step, 0)


def _pass_through(bank: _Bank, accounts: np.ndarray, ledger: _Ledger) -> None:
    """Large sums in, then almost all of it out to an offshore party within days."""
    rng, account = bank.rng, accounts[0]
    for _ in range(int(rng.integers(2, 5))):
        amount = rng.lognormal(np.log(30_000.0 * bank.profile.wealth), 0.7)
        step = int(rng.integers(0, HORIZON_STEPS - 4))
        ledger.add(_external(rng, 1, 10**8), account, amount, step, 0)
        ledger.add(
            account, _external(rng, 1, 2000, True), amount * rng.uniform(0.9, 0.99), step + int(rng.integers(0, 4)), 1
        )


_SCHEMES = {"structuring": _structuring, "fan_in": _fan_in, "cycle": _cycle, "pass_through": _pass_through}


def _bank_transfers(bank: _Bank, merchants: np.ndarray) -> pd.DataFrame:
    ledger = _Ledger()
    _salaries_and_rent(bank, ledger)
    _card_payments(bank, merchants, ledger)
    _business_flows(bank, ledger)
    _innocent_oddities(bank, ledger)
    _large_transfers(bank, ledger)
    for kind, accounts in bank.schemes:
        _SCHEMES[kind](bank, accounts, ledger)
    return ledger.frame()


def generate_transactions(num_banks: int, accounts_per_bank: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Accounts (with the ``laundering`` label) and their transfers, ordered by ``step``."""
    _check_args(num_banks, accounts_per_bank, seed)
    sizes = bank_sizes(num_banks, accounts_per_bank)
    first_ids = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    banks = [_open_bank(i, int(first_ids[i]), n, _bank_rng(seed, "transactions", i)) for i, n in enumerate(sizes)]
    accounts = pd.concat([_accounts_frame(bank) for bank in banks], ignore_index=True)
    merchants = accounts.loc[accounts["account_type"] == "business", "account_id"].to_numpy()
    transfers = pd.concat([_bank_transfers(bank, merchants) for bank in banks], ignore_index=True)
    transfers = transfers.sort_values("step", kind="stable", ignore_index=True)
    return accounts, transfers


# ------------------------------------------------------------------------ writing


def write_federation(task: str, out_dir: str | Path, num_banks: int, rows_per_bank: int, seed: int) -> dict[str, Path]:
    """Write one task's federation as CSV files into ``out_dir`` and return their paths.

    ``rows_per_bank`` counts accounts for ``transactions``. Returns ``{"train": path}`` for
    news and credit, ``{"train": accounts, "series": transfers}`` for transactions.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    _check_args(num_banks, rows_per_bank, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if task == "transactions":
        accounts, transfers = generate_transactions(num_banks, rows_per_bank, seed)
        paths = {"train": out / "accounts.csv", "series": out / "transfers.csv"}
        accounts.to_csv(paths["train"], index=False)
        transfers.to_csv(paths["series"], index=False)
        return paths
    path = out / f"{task}.csv"
    if task == "credit":
        generate_credit(num_banks, rows_per_bank, seed).to_csv(path, index=False)
    else:
        generate_news(num_banks, rows_per_bank, seed, task).to_csv(path, index=False)
    return {"train": path}
