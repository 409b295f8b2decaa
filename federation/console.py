"""The console of a run's Flower processes (the ServerApp and the ClientApps): each log line once,
one line per round from the ServerApp, no weight-loading progress bars.

Why lines were printed twice: Opacus calls `logging.basicConfig` when it is imported
(opacus/utils/module_utils.py), which gives the root logger a stderr handler. Flower's `flwr`
logger has a console handler of its own and also propagates to the root, so every Flower record,
its DEBUG ones included (the root handler has no level), came out a second time in Opacus' format.
Hydra's root handlers do the same in the processes Hydra configures.

Flower's own INFO lines (the configs sent each round, sampling, aggregation, the final dump of
every metric) stay off the console: the ServerApp logs one line per round, and the same numbers
are in the run's metrics.json. Warnings and errors, Flower's included, still show: a bank that
fails or declines is a WARNING of the strategy's.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping

import flwr
from flwr.common.logger import LOGGER_NAME, ConsoleHandler
from transformers.utils import logging as hf_logging

FLOWER_SOURCE = os.path.dirname(flwr.__file__) + os.sep


class WithoutFlowerInfo(logging.Filter):
    """Drops records below WARNING that Flower's own modules logged; passes every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.pathname.startswith(FLOWER_SOURCE):
            return True
        # An actor ended by the simulation's own shutdown (the process guard) is not news.
        return record.levelno >= logging.WARNING and "Manually terminating" not in record.getMessage()


WITHOUT_FLOWER_INFO = WithoutFlowerInfo()


def quiet_console() -> None:
    """Set up this process's console for a run; calling it again changes nothing."""
    flower = logging.getLogger(LOGGER_NAME)
    flower.propagate = False
    for handler in flower.handlers:
        if isinstance(handler, ConsoleHandler):
            handler.addFilter(WITHOUT_FLOWER_INFO)  # a filter already there is not added twice
    # transformers draws a "Loading weights" bar each time a backbone is built (every ClientApp process)
    hf_logging.disable_progress_bar()
    # Ray's tip, at ray.init in the ServerApp of a simulation, that a future Ray will stop hiding GPUs from
    # actors with num_gpus=0: hidden is what `client_gpus: 0` means here, and opting in now would undo it.
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)


def round_line(round_number: int, rounds: int, metrics: Mapping[str, float]) -> str:
    """The ServerApp's console line for a round, e.g. "round 2/3: 14.2 s, central test accuracy 0.7520, loss 0.6011"
    (round 0 is the initial state, without a time; under HE there is no central test)."""
    parts = [f"{metrics['round_seconds']:.1f} s"] if "round_seconds" in metrics else []
    if "accuracy" in metrics:
        parts.append(f"central test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")
    return f"round {round_number}/{rounds}: " + ", ".join(parts)
