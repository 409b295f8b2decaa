"""DP-SGD wiring with real Opacus on a small real model: accounting, clipping, post-noise hooks, guards."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fingpt_federated.privacy.dp_budget import (
    BudgetExceeded,
    PrivacyLedger,
    ledger_path,
)
from fingpt_federated.privacy.dp_settings import DPSettings
from fingpt_federated.privacy.dp_training import (
    PrivateRound,
    StateUnchangedError,
    assert_state_changed,
    make_private,
    register_post_noise_hook,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOCAB, LENGTH, RECORDS = 40, 6, 400
SIGNAL_TOKEN = 3


class TokenClassifier(nn.Module):
    """Mean of token embeddings, then a linear head: label 1 iff the signal token occurs."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens).mean(dim=1))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (RECORDS, LENGTH), generator=generator)
    return TensorDataset(tokens, (tokens == SIGNAL_TOKEN).any(dim=1).long())


def _settings(**changes) -> DPSettings:
    base = dict(
        enabled=True,
        target_epsilon=8.0,
        noise_multiplier=1.0,
        accountant="prv",
        logical_batch_size=64,
        physical_batch_size=16,
        max_grad_norm=1.0,
    )
    return DPSettings(**{**base, **changes})


def _ledger(folder, settings: DPSettings) -> PrivacyLedger:
    return PrivacyLedger.open(
        ledger_path(folder, "run"),
        run="run",
        accountant=settings.accountant,
        delta=settings.delta,
        target_epsilon=settings.target_epsilon,
    )


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _train(
    model: nn.Module,
    settings: DPSettings,
    ledger: PrivacyLedger,
    steps: int,
    *,
    label: str = "1",
    lr: float = 0.5,
    seed: int | None = 0,
    optimizer: torch.optim.Optimizer | None = None,
    data: TensorDataset | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    setup: Callable[[PrivateRound], None] | None = None,
    after_backward: Callable[[PrivateRound], None] | None = None,
) -> PrivateRound:
    """`steps` logical DP-SGD steps of plain SGD, seeded (sampling and noise)."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(data if data is not None else _data(), batch_size=settings.logical_batch_size)
    with make_private(model, optimizer, loader, settings, ledger, round_label=label, steps=steps, seed=seed) as private:
        if setup is not None:
            setup(private)
        while private.steps < steps:
            with private.physical_batches() as batches:
                for batch in batches:
                    if batch is None:
                        private.empty_step()
                        private.optimizer.zero_grad(set_to_none=True)
                        continue
                    tokens, labels = batch
                    loss = F.cross_entropy(model(tokens), labels)
                    if extra_loss is not None:
                        loss = loss + extra_loss()
                    loss.backward()
                    if after_backward is not None:
                        after_backward(private)
                    private.optimizer.step()
                    private.optimizer.zero_grad(set_to_none=True)
                    if private.steps >= steps:
                        break
    return private


@pytest.mark.parametrize("mechanism", ["prv", "rdp"])
def test_reported_epsilon_is_an_opacus_recomputation_and_continues_after_a_restart(tmp_path, mechanism):
    settings = _settings(accountant=mechanism)
    counted = []
    count = lambda private: register_post_noise_hook(private.optimizer, lambda _opt: counted.append(1))  # noqa: E731
    first = _train(TokenClassifier(), settings, _ledger(tmp_path, settings), 12, setup=count)
    independent = {"prv": PRVAccountant, "rdp": RDPAccountant}[mechanism]()
    rate = 1 / -(-RECORDS // settings.logical_batch_size)  # Opacus: 1 / len(loader) = 1/7
    independent.history = [(settings.noise_multiplier, rate, len(counted))]
    assert len(counted) == 12 and first.sample_rate == rate
    assert abs(first.epsilon - independent.get_epsilon(delta=settings.delta)) < 1e-6

    # Restart: new model, optimizer, engine and ledger objects; only the ledger file carries over.
    second = _train(TokenClassifier(), settings, _ledger(tmp_path, settings), 12, label="2", setup=count)
    independent.history = [(settings.noise_multiplier, rate, 24)]
    assert len(counted) == 24
    assert abs(second.epsilon - independent.get_epsilon(delta=settings.delta)) < 1e-6
    assert second.epsilon > first.epsilon


def test_a_round_over_budget_is_refused_before_training(tmp_path):
    settings = _settings(target_epsilon=1.0, noise_multiplier=0.8, accountant="rdp")
    ledger = _ledger(tmp_path, settings)
    model = TokenClassifier()
    before, on_disk = _state(model), ledger.path.read_bytes()
    with pytest.raises(BudgetExceeded, match="budget of 1"):
        _train(model, settings, ledger, 200)
    after = _state(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert ledger.path.read_bytes() == on_disk and ledger.pending is None
    assert not model.embedding._forward_hooks and not hasattr(model.head.weight, "grad_sample")


def test_per_sample_clipping_bound_holds(tmp_path):
    bound = 0.05
    settings = _settings(max_grad_norm=bound, physical_batch_size=16)
    model = TokenClassifier()
    expected: dict[str, torch.Tensor] = {}
    largest: list[float] = []

    def check_clipping(private: PrivateRound) -> None:
        params = dict(model.named_parameters())
        samples = {name: p.grad_sample.detach().clone() for name, p in params.items()}
        flat = torch.cat([g.reshape(len(g), -1) for g in samples.values()], dim=1)
        norms = flat.norm(dim=1)
        factors = (bound / (norms + 1e-6)).clamp(max=1.0)
        clipped_norms = (flat * factors[:, None]).norm(dim=1)
        largest.append(norms.max().item())
        assert (clipped_norms <= bound * (1 + 1e-5)).all()
        for name, g in samples.items():
            clipped_sum = torch.einsum("i,i...", factors, g)
            expected[name] = expected.get(name, 0) + clipped_sum

    def check_sum(private: PrivateRound) -> None:
        def compare(_opt) -> None:  # the real step: the noisy grad is built from exactly these sums
            for name, p in model.named_parameters():
                assert torch.allclose(p.summed_grad, expected[name], atol=1e-6), name
                assert not torch.allclose(p.grad * settings.logical_batch_size, p.summed_grad), "no noise"
            expected.clear()

        register_post_noise_hook(private.optimizer, compare)

    _train(model, settings, _ledger(tmp_path, settings), 3, setup=check_sum, after_backward=check_clipping)
    assert max(largest) > 5 * bound  # clipping really had work to do


def test_a_post_noise_proximal_hook_changes_the_update_and_a_loss_term_does_not(tmp_path):
    mu, lr = 0.5, 0.1
    start = TokenClassifier().state_dict()
    anchor = {name: torch.zeros_like(p) for name, p in TokenClassifier().named_parameters()}

    def run(folder: str, *, hook_mu: float = 0.0, loss_mu: float = 0.0) -> dict[str, torch.Tensor]:
        model = TokenClassifier()
        model.load_state_dict(start)
        settings = _settings()
        params = dict(model.named_parameters())

        def proximal(private: PrivateRound) -> None:
            def correct(_opt) -> None:
                with torch.no_grad():
                    for name, p in params.items():
                        p.grad.add_(p - anchor[name], alpha=hook_mu)

            register_post_noise_hook(private.optimizer, correct)

        def proximal_loss() -> torch.Tensor:
            return loss_mu / 2 * sum(((p - anchor[name]) ** 2).sum() for name, p in params.items())

        ledger = _ledger(tmp_path / folder, settings)
        _train(model, settings, ledger, 1, lr=lr, setup=proximal, extra_loss=proximal_loss)
        return _state(model)

    plain, hooked, as_loss = run("plain"), run("hooked", hook_mu=mu), run("loss", loss_mu=mu)
    for name, initial in start.items():
        # One SGD step: the hook adds exactly mu * (w - anchor) = mu * w after the noise.
        assert torch.allclose(hooked[name] - plain[name], -lr * mu * initial, atol=1e-6), name
        # A proximal loss term is replaced by Opacus's noisy clipped sum: silently dropped.
        assert torch.equal(as_loss[name], plain[name]), name


def test_noise_and_sampling_cannot_be_replayed_from_the_training_seed(tmp_path):
    settings = _settings(accountant="rdp")
    start = TokenClassifier().state_dict()

    def run(folder: str, seed: int | None) -> dict[str, torch.Tensor]:
        model = TokenClassifier()
        model.load_state_dict(start)
        torch.manual_seed(0)  # the public training seed of the config, identical in both runs
        _train(model, settings, _ledger(tmp_path / folder, settings), 2, seed=seed)
        return _state(model)

    first, second = run("a", None), run("b", None)
    assert not torch.equal(first["head.weight"], second["head.weight"])
    assert torch.equal(run("c", 7)["head.weight"], run("d", 7)["head.weight"])  # tests may pin it


def test_assert_state_changed_catches_parameters_that_never_move(tmp_path):
    settings = _settings()
    model = TokenClassifier()
    before = _state(model)
    # Loss and epsilon look normal, but the embedding never moves (a stand-in for Opacus issue 820).
    stuck = torch.optim.SGD(
        [{"params": model.embedding.parameters(), "lr": 0.0}, {"params": model.head.parameters()}], lr=0.5
    )
    _train(model, settings, _ledger(tmp_path, settings), 2, optimizer=stuck)
    after = _state(model)
    assert_state_changed(before, after, names=["head.weight", "head.bias"])
    with pytest.raises(StateUnchangedError, match="embedding.weight"):
        assert_state_changed(before, after)


def test_opacus_is_detached_after_a_round_so_the_model_can_be_reused(tmp_path):
    settings = _settings()
    model = TokenClassifier()
    ledger = _ledger(tmp_path, settings)
    _train(model, settings, ledger, 2)
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    for p in model.parameters():
        assert p.grad is None
        assert not any(hasattr(p, attr) for attr in ("grad_sample", "summed_grad", "_forward_counter"))
    _train(model, settings, _ledger(tmp_path, settings), 2, label="2")  # the next round, same model
    assert PrivacyLedger.load(ledger.path).steps == 4


def test_dp_sgd_learns_the_task_at_a_moderate_budget(tmp_path):
    torch.manual_seed(0)
    settings = _settings(
        noise_multiplier=None, target_epsilon=8.0, planned_rounds=1, accountant="rdp", max_grad_norm=1.0
    )
    model = TokenClassifier()
    private = _train(model, settings, _ledger(tmp_path, settings), 60, lr=2.0)
    assert private.epsilon <= 8.0
    tokens, labels = _data(seed=1).tensors
    with torch.no_grad():
        accuracy = (model(tokens).argmax(dim=1) == labels).float().mean().item()
    majority = max(labels.float().mean().item(), 1 - labels.float().mean().item())
    assert accuracy > majority + 0.1, (accuracy, majority)


def test_empty_poisson_batches_are_noise_only_steps_and_are_accounted(tmp_path):
    settings = _settings(logical_batch_size=2, physical_batch_size=2, accountant="rdp")
    data = TensorDataset(*(t[:200] for t in _data().tensors))  # rate 1/100: ~13% of batches are empty
    empties = []
    model = TokenClassifier()
    before = _state(model)

    def count_empties(private: PrivateRound) -> None:
        original = private.empty_step
        private.empty_step = lambda: (empties.append(1), original())  # type: ignore[method-assign]

    private = _train(model, settings, _ledger(tmp_path, settings), 40, data=data, setup=count_empties)
    assert empties, "no empty batch in 40 draws at rate 1/100: the sampler is not Poisson"
    independent = RDPAccountant()
    independent.history = [(settings.noise_multiplier, 1 / 100, 40)]
    assert abs(private.epsilon - independent.get_epsilon(delta=settings.delta)) < 1e-6
    assert_state_changed(before, _state(model))
