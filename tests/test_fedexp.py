"""FedExP: eta from the spread of the banks' updates, and the server's step past their mean in a real federation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import (  # noqa: F401
    config,
    one_torch_thread,
    recorded_federation,
    server_identity,
)
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fingpt_federated.federation import protocol
from fingpt_federated.server.fedexp import ETA_METRIC, FedExP, extrapolation, squared_norm
from fingpt_federated.server.strategy_config import check_strategy

pytestmark = pytest.mark.usefixtures("tiny_setting")


def test_eta_is_one_when_the_banks_agree_and_grows_with_their_disagreement():
    assert extrapolation(weighted_norms=4.0, mean_norm=4.0, epsilon=1e-3) == 1.0  # equal updates: FedAvg
    # two equal-weight banks with opposite-leaning updates (1, 1) and (1, -1): mean (1, 0), norms 2 each
    zero = {"w": np.zeros(2)}
    d1, d2 = np.array([2.0, 1.0]), np.array([-2.0, 1.0])  # mean (0, 1): norm 1; the banks' norms 5 and 5
    weighted = 0.5 * squared_norm({"w": d1}, zero) + 0.5 * squared_norm({"w": d2}, zero)
    mean = squared_norm({"w": (d1 + d2) / 2}, zero)
    assert (weighted, mean) == (5.0, 1.0)
    assert extrapolation(weighted, mean, 1e-3) == pytest.approx(5.0 / (2 * 1.001))
    assert extrapolation(1.5, 1.0, 1e-3) == 1.0  # mildly apart: never shorter than FedAvg's step
    assert extrapolation(10.0, 0.0, 1e-3) == pytest.approx(10.0 / 2e-3)  # epsilon keeps eta finite


def test_the_server_steps_eta_times_the_banks_weighted_mean_update(tmp_path: Path):
    grid = recorded_federation(tmp_path, "strategy=fedexp", "strategy.local_steps=3", "federation.rounds=2")
    sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    replies = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN]
    assert len(sent) == 6 and len(replies) == 6
    x = {n: a.numpy().astype(np.float64) for n, a in sent[0].content[protocol.ARRAYS].items()}
    states = [{n: a.numpy().astype(np.float64) for n, a in r.content[protocol.ARRAYS].items()} for r in replies[:3]]
    weights = np.array([r.content[protocol.METRICS][protocol.NUM_EXAMPLES] for r in replies[:3]], dtype=float)
    weights /= weights.sum()
    mean = {n: sum(w * s[n] for w, s in zip(weights, states, strict=True)) for n in x}
    spread = sum(w * squared_norm(s, x) for w, s in zip(weights, states, strict=True))
    eta = extrapolation(spread, squared_norm(mean, x), 1e-3)
    assert eta > 1.0  # the banks' updates disagree: the step is longer than FedAvg's
    second = {n: a.numpy() for n, a in sent[3].content[protocol.ARRAYS].items()}
    for name in x:
        np.testing.assert_allclose(second[name], x[name] + eta * (mean[name] - x[name]), rtol=1e-4, atol=1e-6)
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())["rows"]
    etas = [r["metrics"][ETA_METRIC] for r in rows if r["bank"] == "federation" and ETA_METRIC in r["metrics"]]
    assert etas[0] == pytest.approx(eta, rel=1e-4) and len(etas) == 2


@pytest.mark.parametrize(
    ("overrides", "encrypted", "message"),
    [
        ([], True, "not with HE"),
        (["strategy.flower=FedMedian"], False, "extrapolates FedAvg's mean"),
        (["strategy.feddyn_alpha=0.1"], False, "choose one"),
        (["strategy.fedexp_epsilon=0"], False, "must be > 0"),
        (["strategy.fedexp_max_eta=0.5"], False, "must be >= 1"),
    ],
)
def test_fedexp_is_refused_where_it_cannot_work(overrides, encrypted, message):
    with pytest.raises(ValueError, match=message):
        check_strategy(config("strategy=fedexp", *overrides), encrypted=encrypted)


def _reply(update: np.ndarray, examples: int, sent: Message) -> Message:
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({"w": Array(update.astype(np.float32))}),
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: examples}),
        }
    )
    return Message(content, reply_to=sent)


def test_a_bank_that_cancels_the_others_mean_cannot_stretch_the_step_past_max_eta():
    """Two banks at +d, one at -1.9 d (a hostile one): the mean is d / 30, and FedExP's eta, uncapped, would
    be about 720: a step of 24 d, far longer than any bank's update."""
    server_identity()  # the Messages below are built outside a Flower runtime
    x, d = np.zeros(4), np.array([1.0, -2.0, 0.5, 0.0])
    wrapper = FedExP(FedAvg(), epsilon=1e-3, max_eta=5.0)
    sent = Message(
        RecordDict({protocol.ARRAYS: ArrayRecord({"w": Array(x.astype(np.float32))})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    wrapper._sent = {"w": x.astype(np.float32)}
    replies = [_reply(x + d, 10, sent), _reply(x + d, 10, sent), _reply(x - 1.9 * d, 10, sent)]
    arrays, metrics = wrapper.aggregate_train(1, replies)
    mean = d * (2 - 1.9) / 3
    uncapped = extrapolation(float(np.dot([1 / 3] * 3, [d @ d, d @ d, 3.61 * (d @ d)])), float(mean @ mean), 1e-3)
    assert uncapped > 700
    assert metrics[ETA_METRIC] == 5.0
    np.testing.assert_allclose(arrays["w"].numpy(), x + 5.0 * mean, rtol=1e-5)
    assert float(np.linalg.norm(arrays["w"].numpy() - x)) < float(np.linalg.norm(d))  # no longer than a bank's
