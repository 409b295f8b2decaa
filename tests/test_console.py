"""The console of a run: each log line once, one line per round, no weight-loading bars, no deprecation warnings."""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import opacus  # noqa: F401  (its import-time logging.basicConfig is what printed every Flower line twice)
import pytest
from federation_helpers import config, news_data_overrides, write_news_csv
from flwr.common import log
from flwr.common.logger import LOGGER_NAME, ConsoleHandler

from fingpt_federated.federation.console import FLOWER_SOURCE, WITHOUT_FLOWER_INFO, quiet_console, round_line
from fingpt_federated.simulations.flower_run import bank_info
from fingpt_federated.simulations.sim import simulate

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def flower_console() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Flower's console handler writing to one buffer, and a root handler as `logging.basicConfig` installs it
    (Opacus calls it at import; Hydra installs its own) writing to another; everything restored afterwards."""
    flower = logging.getLogger(LOGGER_NAME)
    console = next(h for h in flower.handlers if isinstance(h, ConsoleHandler))
    saved = flower.propagate, console.stream, list(console.filters)
    shown, root_shown = io.StringIO(), io.StringIO()
    console.setStream(shown)
    root_handler = logging.StreamHandler(root_shown)
    logging.getLogger().addHandler(root_handler)
    flower.propagate = True  # Flower's default
    try:
        yield shown, root_shown
    finally:
        logging.getLogger().removeHandler(root_handler)
        flower.propagate = saved[0]
        console.setStream(saved[1])
        console.filters = saved[2]


def test_a_flower_record_reaches_the_console_once_after_quiet_console(flower_console):
    shown, root_shown = flower_console
    log(logging.INFO, "before")
    assert "before" in shown.getvalue() and "before" in root_shown.getvalue()  # the duplicate, as it was

    quiet_console()
    quiet_console()  # a second call (every ClientApp message makes one) adds nothing
    log(logging.INFO, "after")
    assert shown.getvalue().count("after") == 1
    assert "after" not in root_shown.getvalue()


def test_flower_info_stays_off_the_console_but_its_warnings_and_ours_do_not(flower_console):
    shown, _ = flower_console
    quiet_console()
    console = next(h for h in logging.getLogger(LOGGER_NAME).handlers if isinstance(h, ConsoleHandler))
    assert console.filters.count(WITHOUT_FLOWER_INFO) == 1

    def record(level: int, path: str, message: str) -> logging.LogRecord:
        return logging.LogRecord(LOGGER_NAME, level, path, 1, message, None, None)

    flower_module = str(Path(FLOWER_SOURCE) / "serverapp" / "strategy" / "strategy_utils.py")
    console.handle(record(logging.INFO, flower_module, "configure_train: Sampled 5 nodes"))
    console.handle(record(logging.WARNING, flower_module, "flower warns"))
    log(logging.INFO, "our round line")
    text = shown.getvalue()
    assert "Sampled 5 nodes" not in text
    assert "flower warns" in text and "our round line" in text


def test_the_round_line_has_the_round_its_time_and_the_central_test_when_there_is_one():
    initial = round_line(0, 3, {"accuracy": 0.31, "loss": 1.1443})
    assert initial == "round 0/3: central test accuracy 0.3100, loss 1.1443"
    line = round_line(2, 3, {"accuracy": 0.75, "loss": 0.6, "macro_f1": 0.7, "round_seconds": 14.24})
    assert line == "round 2/3: 14.2 s, central test accuracy 0.7500, loss 0.6000"
    assert round_line(1, 3, {"round_seconds": 3.0}) == "round 1/3: 3.0 s"  # under HE: no central test


def test_only_the_banks_info_lines_are_left_out_of_the_echo():
    actor = "\x1b[36m(ClientAppActor pid=16757)\x1b[0m "
    assert bank_info(actor + "\x1b[92mINFO \x1b[0m:      bank bank_01 round 1: 21/21 local steps, loss 1.0739\n")
    assert not bank_info(actor + "\x1b[93mWARNING \x1b[0m:   bank bank_01 round 3: declines to train\n")
    assert not bank_info(actor + "Traceback (most recent call last):\n")
    assert not bank_info("\x1b[92mINFO \x1b[0m:      round 1/2: 29.5 s, central test accuracy 0.3775, loss 1.0985\n")


@pytest.mark.slow
def test_a_simulated_run_prints_each_line_once_and_one_line_per_round(tmp_path, capfd):
    news = write_news_csv(tmp_path / "news.csv", rows=240)
    simulate(
        config(*news_data_overrides(news), "federation=iid", "federation.num_banks=3", "federation.rounds=2"),
        tmp_path / "run",
    )
    out, err = capfd.readouterr()
    lines = [ANSI.sub("", line).rstrip() for line in (out + err).splitlines() if line.strip()]

    repeated = {line: n for line, n in Counter(lines).items() if n > 1}
    assert not repeated, repeated
    rounds = [line for line in lines if re.search(r"\bround \d+/2: ", line)]
    assert len(rounds) == 3 and all("central test accuracy" in line for line in rounds), rounds
    for noise in ("Warning:", "Loading weights", "ClientAppActor", "Aggregated MetricRecord"):
        assert not [line for line in lines if noise in line], noise
