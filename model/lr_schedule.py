"""Learning rates that decay across rounds: one cosine, shared by the banks' and the server's steps.

Round r of R (from 1) gets final + (start - final) * (1 + cos(pi * (r - 1) / (R - 1))) / 2: `start`
in the first round, `final` in the last, and rounds past R stay at `final` (a resumed run that
goes on longer). A federation's progress stalls when every round takes steps of the same size
around a moving optimum (issue 26: the test loss rises after round 10 on quick_parity); smaller
steps late let the average settle.
"""

from __future__ import annotations

import math


def cosine(start: float, final: float, server_round: int, planned_rounds: int) -> float:
    """The rate of round `server_round` (from 1) on a cosine from `start` to `final` over `planned_rounds`."""
    if planned_rounds < 2:
        return start
    progress = min(max(server_round - 1, 0), planned_rounds - 1) / (planned_rounds - 1)
    return final + (start - final) * (1 + math.cos(math.pi * progress)) / 2
