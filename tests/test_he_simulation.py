"""`fingpt-sim privacy=he` end to end on Flower's simulation engine, against the same plaintext run.

Both runs train the same seeded local models; only the aggregation differs (ciphertext sums and
a bank-side decryption versus Flower's FedAvg), so the global models, and their accuracies, must
agree. The report shows the bytes each round put on the wire.
"""

from __future__ import annotations

import pytest
from federation_helpers import config, news_data_overrides, write_news_csv

from fingpt_federated.server.history import FEDERATION, History
from fingpt_federated.simulations.encryption import HE_DIR
from fingpt_federated.simulations.sim import simulate

pytestmark = pytest.mark.slow

SETTING = [
    "federation=dirichlet",
    "federation.num_banks=3",
    "federation.alpha=0.3",
    "seed=2",
    "federation.rounds=2",
    "strategy.local_steps=4",
    "model.max_length=16",
    "model.train.lr=5e-3",
]


def test_encrypted_and_plaintext_simulations_reach_the_same_accuracy(tmp_path):
    news_csv = write_news_csv(tmp_path / "news.csv", rows=240)
    plain = simulate(config(*news_data_overrides(news_csv), *SETTING), tmp_path / "plain", echo=False)
    # BFV (the default): ~80 examples x drift <= 0.05 per bank, so a bound of 16 keeps a fine step (2^-8);
    # the stochastic rounding is seeded by the OS, so one borderline test example (of 48) may differ
    bfv = ("privacy=he", "privacy.he.quantization_bound=16")
    he = simulate(config(*news_data_overrides(news_csv), *SETTING, *bfv), tmp_path / "he", echo=False)

    assert abs(he.final.test_accuracy - plain.final.test_accuracy) <= 1 / 48 + 1e-9, (he.final, plain.final)
    plain_rounds = {r.round: r for r in plain.rounds}
    assert [r.round for r in he.rounds] == [0, 1, 2]  # round 0: the public initial state, as in plaintext
    assert he.rounds[0].test_accuracy == plain.rounds[0].test_accuracy
    for ours in he.rounds[1:]:  # round 0 has no federated evaluation in either run
        theirs = plain_rounds[ours.round]
        assert abs(ours.valid_accuracy - theirs.valid_accuracy) <= 0.03 and ours.banks_ok == theirs.banks_ok == 3
    assert not (tmp_path / "he" / "global_state.he").stat().st_size == 0
    assert (tmp_path / "he" / HE_DIR / "he_secret.ctx").stat().st_mode & 0o777 == 0o600

    history = History.from_json((tmp_path / "he" / "metrics.json").read_text())
    plain_history = History.from_json((tmp_path / "plain" / "metrics.json").read_text())
    up, plain_up = (h.select("train", FEDERATION)[-1].metrics["upload_bytes"] for h in (history, plain_history))
    assert 3 < up / plain_up < 6, (up, plain_up)  # BFV, N values per ciphertext (CKKS: 7.8x)
    report = (tmp_path / "he" / "report.md").read_text()
    assert "upload MB" in report and "bytes per parameter" in report
