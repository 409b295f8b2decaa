"""Canaries: records a model can only fit by memorising them.

Each canary is a unique string of random letter-groups (no word of any data set, so nothing else in the
bank's data predicts it) with a label drawn uniformly at random: the only way a model lowers a canary's
loss is to memorise that very record. `count` canaries are inserted into one bank's training data
(the `canaries:COUNT` bank behaviour, client/hostile.py); their `count` held-out twins, drawn the same
way, are never inserted, and are what a non-member looks like. Which of the 2 * count candidates is
inserted is a seeded coin, so the auditor (simulations/audit.py) rebuilds the same split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEED = 20_231_025
LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


@dataclass(frozen=True)
class CanarySet:
    texts: list[str]
    labels: np.ndarray
    member: np.ndarray  # bool: inserted into the bank's training data

    def split(self, inserted: bool) -> tuple[list[str], np.ndarray]:
        keep = self.member == inserted
        return [t for t, k in zip(self.texts, keep, strict=True) if k], self.labels[keep]


def canary_set(count: int, num_classes: int, seed: int = SEED) -> CanarySet:
    """2 * `count` unique canaries with random labels, `count` of them (a seeded choice) members."""
    if count < 1 or num_classes < 2:
        raise ValueError(f"canaries need a count >= 1 and at least 2 classes, got {count} and {num_classes}")
    rng = np.random.default_rng(seed)
    texts = random_texts(rng, 2 * count)
    labels = rng.integers(0, num_classes, size=2 * count)
    member = np.zeros(2 * count, dtype=bool)
    member[rng.permutation(2 * count)[:count]] = True
    return CanarySet(texts, labels, member)


def population(count: int, avoid: list[str], seed: int = SEED + 1) -> list[str]:
    """`count` more texts drawn as the canaries are, none of them in `avoid`: known non-members from the
    canaries' distribution, which the membership score's null distribution is fitted on (membership.py)."""
    return random_texts(np.random.default_rng(seed), count, set(avoid))


def random_texts(rng: np.random.Generator, count: int, avoid: set[str] | None = None) -> list[str]:
    """`count` unique strings of 8 random letter groups (3 to 7 letters each), none in `avoid`."""
    texts: list[str] = []
    seen = set(avoid or ())
    while len(texts) < count:
        words = ["".join(rng.choice(LETTERS, size=int(rng.integers(3, 8)))) for _ in range(8)]
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts
