"""Predictions as users get them: audited (one redacted JSON line each), cached for repeated inputs.

The audit entry is written before the prediction is returned, and the explanation a caller gets
is the redacted one the audit log wrote (token pieces of PII in the input are masked there).

The model runs one chunk of records at a time (CHUNK), in the order of infer/scheduling.py
(between chunks, the waiting request that costs least), and a request's deadline is checked
before each chunk.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from fingpt_federated.data.records import BankDataset
from fingpt_federated.infer.inputs import records_to_dataset
from fingpt_federated.infer.limits import Deadline, passes
from fingpt_federated.infer.predictor import Prediction, Predictor
from fingpt_federated.infer.scheduling import Job, Scheduler
from fingpt_federated.privacy.audit import AuditLog, input_hash

CHUNK = 4


class LRUCache:
    """A thread-safe least-recently-used map of input hashes to predictions."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, Prediction] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> Prediction | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key: str, value: Prediction) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class PredictionService:
    def __init__(self, predictor: Predictor, card: Mapping[str, Any], audit: AuditLog, cache_size: int = 1024) -> None:
        self.predictor = predictor
        self.card = card
        self.audit = audit
        self.cache = LRUCache(cache_size)
        self.scheduler = Scheduler()  # who gets the model, one chunk at a time; create_app sets its limits

    @property
    def model_hash(self) -> str:
        return str(self.card["model_hash"])

    def predict_data(
        self,
        data: BankDataset,
        inputs: Sequence[Mapping[str, Any]],
        *,
        explain: bool = True,
        mc_samples: int = 0,
        progress: bool = False,
    ) -> list[dict[str, Any]]:
        """Predict every record of `data` (`inputs[i]` is record i as audited), uncached."""
        predictions = self.scheduler.run(
            None, 0, lambda: self.predictor.predict(data, explain=explain, mc_samples=mc_samples, progress=progress)
        )
        return [self.audited(record, p) for record, p in zip(inputs, predictions, strict=True)]

    def predict_records(
        self,
        records: Sequence[Mapping[str, Any]],
        *,
        explain: bool = True,
        mc_samples: int = 0,
        deadline: Deadline | None = None,
        job: Job | None = None,
    ) -> list[dict[str, Any]]:
        """Predict checked request records; repeated inputs (same options) come from the cache.

        `job`: the request's admission (its place in line for the model). With a deadline, raises
        TimeLimitExceeded when it passes while waiting for the model or between chunks (chunks
        predicted by then stay cached; nothing is audited or returned).
        """
        keys = [input_hash({"record": r, "explain": explain, "mc_samples": mc_samples}) for r in records]
        found = [self.cache.get(key) for key in keys]
        missing = [i for i, hit in enumerate(found) if hit is None]
        for start in range(0, len(missing), CHUNK):
            chunk = missing[start : start + CHUNK]
            data = records_to_dataset([records[i] for i in chunk], self.predictor.published.manifest)
            units = passes(len(chunk), mc_samples, explain)
            fresh = self._predict_chunk(data, job, units, deadline, explain=explain, mc_samples=mc_samples)
            for i, prediction in zip(chunk, fresh, strict=True):
                self.cache.put(keys[i], prediction)
                found[i] = prediction
        done = [prediction for prediction in found if prediction is not None]  # every miss was filled above
        return [self.audited(record, prediction) for record, prediction in zip(records, done, strict=True)]

    def _predict_chunk(
        self, data: BankDataset, job: Job | None, units: int, deadline: Deadline | None, **options: Any
    ) -> list[Prediction]:
        def work() -> list[Prediction]:
            if deadline is not None:
                deadline.check()
            return self.predictor.predict(data, **options)

        return self.scheduler.run(job, units, work, deadline.remaining() if deadline is not None else None)

    def audited(self, inputs: Mapping[str, Any], prediction: Prediction) -> dict[str, Any]:
        entry = self.audit.record(self.model_hash, dict(inputs), prediction.output(), prediction.explanation)
        result = prediction.output()
        if prediction.explanation is not None:
            result["explanation"] = entry["explanation"]
        return result
