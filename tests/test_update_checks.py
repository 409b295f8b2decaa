"""Every plaintext update is checked before aggregation (server/update_checks.py), the hostile
behaviours of the harness (client/hostile.py), and the check of a decrypted HE aggregate."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fingpt_federated.client.encryption import AggregateRefused, check_aggregate
from fingpt_federated.client.hostile import Misbehaviour, control_change, misbehave, parse_all, reported_examples
from fingpt_federated.conf import compose_config
from fingpt_federated.federation import protocol
from fingpt_federated.server.bank_rounds import BankRounds
from fingpt_federated.server.history import History
from fingpt_federated.server.replies import unusable_metrics
from fingpt_federated.server.strategy_config import build_strategy, check_strategy
from fingpt_federated.server.update_checks import Bound, UpdateChecks, UpdateGate, non_finite

SENT = {"a.weight": np.ones((4, 3), dtype=np.float32), "b.bias": np.zeros(5, dtype=np.float32)}


def reply(state: dict, examples: float = 10, **extra_records) -> RecordDict:
    metrics = MetricRecord({protocol.NUM_EXAMPLES: examples, "train_loss": 0.5})
    return RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: Array(v) for k, v in state.items()}),
            protocol.METRICS: metrics,
            **extra_records,
        }
    )


def moved(by: float) -> dict:
    """The state sent plus `by` in every value."""
    return {name: value + np.float32(by) for name, value in SENT.items()}


def gate(**limits) -> UpdateGate:
    checks = UpdateGate(UpdateChecks(**limits))
    checks.sent(1, ArrayRecord({k: Array(v) for k, v in SENT.items()}))
    return checks


def test_an_honest_update_passes_with_its_norm():
    problem, norm = gate().check(reply(moved(0.1)))
    assert problem == ""
    assert norm == pytest.approx(0.1 * math.sqrt(17), rel=1e-5)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"a.weight": SENT["a.weight"]}, "missing b.bias"),
        ({**moved(0.1), "c": np.ones(2, np.float32)}, "unexpected c"),
        (
            {**moved(0.1), "b.bias": np.zeros(6, np.float32)},
            "tensor b.bias is float32[6], the state sent has float32[5]",
        ),
        ({**moved(0.1), "b.bias": np.zeros(5, np.float64)}, "tensor b.bias is float64[5]"),
        ({**moved(0.1), "b.bias": np.array([0, np.nan, np.inf, 0, 0], np.float32)}, "2 non-finite values"),
        (SENT, "replayed state: it is the global state sent in round 1"),
    ],
)
def test_a_malformed_or_replayed_state_is_refused_with_the_reason(state, expected):
    problem, _ = gate().check(reply(state))
    assert expected in problem


@pytest.mark.parametrize("examples", [0, -3, math.nan, math.inf])
def test_an_impossible_example_count_is_refused(examples):
    assert "num-examples must be a positive finite count" in gate().check(reply(moved(0.1), examples))[0]


def test_a_second_state_or_metric_record_is_refused_before_flower_skips_the_round():
    extra = ArrayRecord({"x": Array(np.ones(1, np.float32))})
    assert "expected the array records ['arrays']" in gate().check(reply(moved(0.1), extra=extra))[0]
    assert "expected one metric record" in gate().check(reply(moved(0.1), more=MetricRecord({"k": 1.0})))[0]


def test_scaffolds_control_change_is_expected_only_with_scaffold_and_checked_as_the_state():
    change = {name: np.full(value.shape, 0.5, np.float32) for name, value in SENT.items()}
    with_change = reply(moved(0.1), **{protocol.CONTROL_UPDATE: ArrayRecord({k: Array(v) for k, v in change.items()})})
    assert "expected the array records ['arrays']" in gate().check(with_change)[0]
    scaffold = UpdateGate(UpdateChecks(), control=True)
    scaffold.sent(1, ArrayRecord({k: Array(v) for k, v in SENT.items()}))
    assert scaffold.check(with_change)[0] == ""
    assert "expected the array records ['arrays', 'scaffold-update']" in scaffold.check(reply(moved(0.1)))[0]
    bad = {**change, "b.bias": np.array([0, np.nan, 0, 0, 0], np.float32)}
    bad_change = reply(moved(0.2), **{protocol.CONTROL_UPDATE: ArrayRecord({k: Array(v) for k, v in bad.items()})})
    assert (
        "control variate change: 1 non-finite values (NaN or infinite) in 1 tensors: b.bias"
        in scaffold.check(bad_change)[0]
    )


def control_reply(update_by: float, change_value: float) -> RecordDict:
    """A SCAFFOLD reply: the state sent moved by `update_by`, a control variate change of `change_value` everywhere."""
    change = {name: np.full(value.shape, change_value, np.float32) for name, value in SENT.items()}
    return reply(moved(update_by), **{protocol.CONTROL_UPDATE: ArrayRecord({k: Array(v) for k, v in change.items()})})


def test_a_control_variate_change_far_above_the_rounds_median_is_refused_and_clipped_to_it():
    """SCAFFOLD adds every bank's change into c, which corrects every bank's local steps: a bank that sends
    a huge (finite) change would steer them all, with an honest-sized update."""
    checks = UpdateGate(UpdateChecks(clip_norm_ratio=1.0), control=True)
    checks.sent(1, ArrayRecord({k: Array(v) for k, v in SENT.items()}))
    replies = {"a": control_reply(0.1, 0.5), "b": control_reply(0.1, 0.6), "c": control_reply(0.1, 0.4)}
    replies["d"] = control_reply(0.1, 1e4)
    assert checks.control_norm(replies["a"]) == pytest.approx(0.5 * math.sqrt(17))
    assert math.isnan(checks.control_norm(reply(moved(0.1))))
    norms = {key: checks.check(content)[1] for key, content in replies.items()}
    controls = {key: checks.control_norm(content) for key, content in replies.items()}
    keys = dict.fromkeys(replies, frozenset({"num-examples"}))
    refused = checks.outliers(norms, keys, controls)
    assert set(refused) == {"d"} and "control variate change norm" in refused["d"]
    assert "18181.8 x the round's median" in refused["d"]
    # Under the ratio (max_norm_ratio off), clipping takes it to the round's median change norm.
    bounded = gate(clip_norm_ratio=1.0).bounds(
        norms, dict.fromkeys(replies, 10.0), dict.fromkeys(replies, "x"), controls
    )
    assert set(bounded) == {"b", "d"} and bounded["d"].scale == 1.0
    assert bounded["d"].control_scale == pytest.approx(0.55 / 1e4)
    bounded["d"].apply(replies["d"], SENT)
    assert checks.control_norm(replies["d"]) == pytest.approx(0.55 * math.sqrt(17), rel=1e-5)


def test_an_update_already_accepted_cannot_be_sent_again():
    checks = gate()
    content = reply(moved(0.1))
    checks.accepted(content, "bank_a", 1)
    checks.sent(2, ArrayRecord({k: Array(v) for k, v in moved(0.05).items()}))
    assert checks.check(content)[0] == "replayed state: it is the update of bank_a in round 1"


def test_an_absolute_norm_bound_refuses_a_larger_update():
    problem, norm = gate(max_norm=1.0).check(reply(moved(1.0)))
    assert "update norm 4.123 above strategy.update_checks.max_norm=1" in problem and norm > 1


def test_updates_far_above_the_rounds_median_are_refused():
    norms = {"a": 1.0, "b": 1.2, "c": 0.9, "d": 11.0, "e": 50.0}
    keys = dict.fromkeys(norms, frozenset({"num-examples"}))
    refused = gate(max_norm_ratio=10.0).outliers(norms, keys)
    assert set(refused) == {"e"} and "is 41.7 x the round's median 1.2" in refused["e"]
    assert gate(max_norm_ratio=None).outliers(norms, keys) == {}
    # Two replies: their median is their mean, it tells nothing about which one is out of line.
    assert gate().outliers({"a": 1.0, "b": 1000.0}, {"a": frozenset(), "b": frozenset()}) == {}


def test_bounds_scale_updates_and_cap_counts_above_the_rounds_medians():
    norms = {"a": 1.0, "b": 1.2, "c": 0.9, "d": 5.0}  # median 1.1
    examples = {"a": 10.0, "b": 30.0, "c": 20.0, "d": 1000.0}  # median 25
    banks = {key: f"bank_{key}" for key in norms}
    bounded = gate(clip_norm_ratio=1.0, max_examples_ratio=2.0).bounds(norms, examples, banks)
    assert set(bounded) == {"b", "d"}
    assert bounded["d"].scale == pytest.approx(1.1 / 5.0) and bounded["d"].examples == 50.0
    assert bounded["b"].scale == pytest.approx(1.1 / 1.2) and bounded["b"].examples is None
    assert gate(max_examples_ratio=2.0).bounds(norms, examples, banks) == {"d": Bound(1.0, 50.0)}
    assert gate().bounds(norms, examples, banks) == {}  # off by default
    # Two replies: no median to bound them by.
    assert gate(clip_norm_ratio=1.0).bounds({"a": 1.0, "b": 9.0}, {"a": 1.0, "b": 1.0}, banks) == {}


def test_a_registered_count_caps_what_a_bank_is_weighed_as_and_an_unregistered_bank_is_refused():
    registry = {"bank_a": 10.0, "bank_b": 30.0, "bank_d": 15.0}
    checks = gate(registered_examples=registry)
    norms, examples = {"a": 1.0, "d": 1.0}, {"a": 10.0, "d": 1000.0}
    banks = {"a": "bank_a", "d": "bank_d"}
    assert checks.bounds(norms, examples, banks) == {"d": Bound(1.0, 15.0)}  # also with fewer than 3 replies
    # with a median cap too, the lower of the two caps
    both = gate(registered_examples=registry, max_examples_ratio=1.0)
    assert both.bounds({**norms, "b": 1.0}, {**examples, "b": 12.0}, {**banks, "b": "bank_b"})["d"].examples == 12.0
    assert checks.unregistered("bank_a") == ""
    assert "bank_x has no count in strategy.update_checks.registered_examples" in checks.unregistered("bank_x")
    assert gate().unregistered("bank_x") == ""  # no registry: nobody is refused for it
    # evaluate counts (their say in the validation metrics) are capped by the same rule, norms or not
    assert checks.count_caps({"d": 500.0, "b": 15.0}, {"d": "bank_d", "b": "bank_b"}) == {"d": 15.0}
    assert both.count_caps({"a": 10.0, "b": 12.0, "d": 1000.0}, banks | {"b": "bank_b"}) == {"d": 12.0}
    median_only = gate(max_examples_ratio=2.0)
    assert median_only.count_caps({"a": 10.0, "b": 12.0, "d": 1000.0}, banks | {"b": "bank_b"}) == {"d": 24.0}
    assert median_only.count_caps({"a": 10.0, "d": 1000.0}, banks) == {}  # no median of two
    with pytest.raises(ValueError, match="registered_examples.bank_a must be a positive count"):
        UpdateChecks(registered_examples={"bank_a": 0})


def test_a_bound_moves_the_reply_toward_the_state_sent_and_replaces_its_count():
    checks = gate(clip_norm_ratio=1.0)
    content = reply(moved(2.0), examples=500)
    checks.bound(content, Bound(0.25, 40.0), "bank_d", 1)
    state = {name: array.numpy() for name, array in content[protocol.ARRAYS].items()}
    assert all(np.allclose(state[name], SENT[name] + 0.5) and state[name].dtype == np.float32 for name in SENT)
    assert content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES] == 40.0
    # The reply as the bank sent it counts as accepted: sending it again is a replay.
    assert checks.check(reply(moved(2.0)))[0] == "replayed state: it is the update of bank_d in round 1"


def test_a_reply_whose_metric_keys_differ_from_the_others_is_refused():
    keys = {"a": frozenset({"n", "loss"}), "b": frozenset({"n", "loss"}), "c": frozenset({"n", "loss", "x"})}
    refused = gate().outliers({"a": 1.0, "b": 1.0, "c": 1.0}, keys)
    assert list(refused) == ["c"] and "differ from the other banks'" in refused["c"]


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="strategy.update_checks.max_norm_ratio must be a positive number or null"):
        UpdateChecks(max_norm_ratio=0.0)
    with pytest.raises(ValueError, match="strategy.update_checks.max_norm must be"):
        UpdateChecks(max_norm=math.nan)


def test_a_non_finite_aggregate_is_named():
    arrays = ArrayRecord({"ok": Array(np.ones(2, np.float32)), "bad": Array(np.array([1, np.inf], np.float32))})
    assert non_finite(arrays) == ["bad"]


def torch_state(value: float) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((name, torch.full(tuple(array.shape), value)) for name, array in SENT.items())


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        ("scale:10", 1.0 + 10 * 0.5),
        ("sign_flip", 1.0 - 0.5),
        ("sign_flip:2", 1.0 - 2 * 0.5),
        ("replay", 0.0),
        ("constant:7", 7.0),
        ("constant", 0.0),
    ],
)
def test_each_hostile_behaviour_sends_what_it_says(behaviour, expected):
    sent, local, initial = torch_state(1.0), torch_state(1.5), torch_state(0.0)
    out = misbehave(behaviour, local, sent, initial)
    assert all(torch.allclose(value, torch.full_like(value, expected)) for value in out.values())
    assert all(torch.equal(value, torch.full_like(value, 1.5)) for value in local.values())  # not in place


def test_non_finite_and_wrong_shape_behaviours():
    sent = torch_state(1.0)
    nan = misbehave("nan", sent, sent, sent)
    assert all(int(torch.isnan(value).sum()) == 1 for value in nan.values())
    assert all(bool(torch.isinf(value).any()) for value in misbehave("inf", sent, sent, sent).values())
    shapes = {name: tuple(value.shape) for name, value in misbehave("wrong_shape", sent, sent, sent).items()}
    assert shapes == {"a.weight": (5, 3), "b.bias": (5,)}
    assert misbehave("", sent, sent, sent) is sent


@pytest.mark.parametrize(
    ("text", "message"),
    [("flip", "unknown hostile behaviour 'flip'"), ("scale:x", "must be a number"), ("scale:inf", "must be finite")],
)
def test_an_unknown_behaviour_is_refused_naming_the_known_ones(text, message):
    with pytest.raises(ValueError, match=message):
        Misbehaviour.parse(text)


def test_behaviours_combine_one_of_each_group():
    assert [b.kind for b in parse_all("backdoor:0:cf+scale:5+inflate:10")] == ["backdoor", "scale", "inflate"]
    assert parse_all("") == []
    sent, local = torch_state(1.0), torch_state(1.5)
    out = misbehave("backdoor:0+scale:4", local, sent, sent)  # the data part changes what it trains on only
    assert all(torch.allclose(value, torch.full_like(value, 3.0)) for value in out.values())
    assert reported_examples("scale:4+inflate:10", 37) == 370 and reported_examples("scale:4", 37) == 37
    assert reported_examples("inflate:0.001", 37) == 1
    with pytest.raises(ValueError, match="at most one behaviour of each group"):
        parse_all("scale:2+sign_flip")
    with pytest.raises(ValueError, match="the count factor must be positive"):
        parse_all("inflate:-1")
    change = torch_state(0.5)
    honest = misbehave("control:100", local, sent, sent)  # its state is honest
    assert all(torch.equal(honest[name], local[name]) for name in local)
    boosted = control_change("scale:4+control:100", change)
    assert all(torch.allclose(value, torch.full_like(value, 50.0)) for value in boosted.values())
    assert control_change("scale:4", change) is change


def test_a_bank_refuses_a_decrypted_aggregate_that_is_not_finite_or_out_of_bounds():
    initial = torch_state(0.0)
    fine = {name: np.full(array.shape, 3.0, np.float32) for name, array in SENT.items()}
    check_aggregate(fine, initial, 16.0, "bank a round 2")
    with pytest.raises(AggregateRefused, match="bank a round 2: the decrypted global aggregate drifts 17 .* above"):
        check_aggregate({**fine, "b.bias": np.full(5, 17.0, np.float32)}, initial, 16.0, "bank a round 2")
    with pytest.raises(AggregateRefused, match="holds 1 non-finite values"):
        check_aggregate({**fine, "b.bias": np.array([0, 0, np.nan, 0, 0], np.float32)}, initial, 16.0, "bank a")


def test_the_strategy_config_sets_the_limits_and_robust_rules_are_plaintext_only():
    cfg = compose_config(
        ["model=tiny_encoder", "strategy.update_checks.max_norm=3", "strategy.update_checks.max_norm_ratio=null"]
    )
    rounds = build_strategy(cfg, History())
    assert rounds.update_gate is not None and rounds.update_gate.limits == UpdateChecks(
        max_norm=3.0, max_norm_ratio=None
    )
    with pytest.raises(ValueError, match="strategy.update_checks.max_norm_ratio must be a positive number"):
        check_strategy(compose_config(["strategy.update_checks.max_norm_ratio=-1"]), encrypted=False)
    for bound in (
        "strategy.update_checks.clip_norm_ratio=1",
        "++strategy.update_checks.registered_examples={bank_a:10}",
    ):
        with pytest.raises(ValueError, match="registered_examples bound each bank's plaintext update"):
            check_strategy(compose_config([bound]), encrypted=True)
    for strategy, flower in (
        ("fedmedian", "FedMedian"),
        ("krum", "Krum"),
        ("multikrum", "MultiKrum"),
        ("bulyan", "Bulyan"),
    ):
        assert type(build_strategy(compose_config([f"strategy={strategy}"]), History()).strategy).__name__ == flower
        with pytest.raises(ValueError, match=f"strategy={strategy} needs the plaintext global state"):
            check_strategy(compose_config([f"strategy={strategy}"]), encrypted=True)


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"accuracy": 0.5, "loss": 1.2, protocol.NUM_EXAMPLES: 40}, ""),
        ({"accuracy": math.nan, "loss": 1.2, protocol.NUM_EXAMPLES: 40}, "accuracy"),
        ({"accuracy": 0.5, "loss": math.inf, protocol.NUM_EXAMPLES: 40}, "loss"),
        ({"accuracy": 1.0, "macro_f1": 0.0, "loss": 0.0, protocol.NUM_EXAMPLES: 1}, ""),  # the ends of each range
        ({"accuracy": 0.5, "macro_f1": 1e9, "loss": 1.2, protocol.NUM_EXAMPLES: 40}, "macro_f1 1000000000.0"),
        ({"accuracy": -0.1, "loss": 1.2, protocol.NUM_EXAMPLES: 40}, "accuracy -0.1 (not within [0, 1])"),
        ({"roc_auc": 0.9, "roc_auc_share": 2.0, protocol.NUM_EXAMPLES: 40}, "roc_auc_share 2.0"),
        ({"accuracy": 0.5, "loss": -3.0, protocol.NUM_EXAMPLES: 40}, "loss -3.0 (negative)"),
        ({"accuracy": 0.5, "loss": 1.2, protocol.NUM_EXAMPLES: 0}, "num-examples 0 (not a positive whole number)"),
        ({"accuracy": 0.5, "loss": 1.2, protocol.NUM_EXAMPLES: 2.5}, "num-examples 2.5"),
    ],
)
def test_an_evaluate_reply_with_unusable_metrics_is_refused(metrics, expected):
    reason = unusable_metrics(MetricRecord(metrics))
    assert (reason == "") == (expected == "")
    assert expected in reason


def test_a_node_keeps_its_bank_name_and_no_two_nodes_share_one():
    """The name picks the registered count a reply is weighed by: a node may not take another bank's name."""
    rounds = BankRounds(FedAvg(), min_banks=1, history=History())
    assert rounds._impersonation(1, "bank_a") == ""
    rounds.bank_of_node[1] = "bank_a"
    assert rounds._impersonation(1, "bank_a") == ""
    assert rounds._impersonation(2, "bank_a") == "bank name bank_a already answered from node 1"
    assert rounds._impersonation(1, "bank_b") == "node 1 answered as bank bank_a before, now as bank_b"
