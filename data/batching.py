"""From a bank's column-wise data to padded model batches.

Texts are tokenised once, up front. Items are plain tuples of tensors
(token ids, series, series mask, numeric features, categorical hashes, label) so that a torch
DataLoader, and later Opacus's Poisson-sampling DPDataLoader (which inspects the first item's
tensors), can use them as they are.
The collator pads token ids to the longest text of the batch and cuts the series after the last
real step of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from fingpt_federated.data.records import BankDataset

Item = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Batch:
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    series: torch.Tensor | None
    series_mask: torch.Tensor | None
    labels: torch.Tensor
    numeric: torch.Tensor | None = None  # (B, Fn) raw static numbers
    categorical: torch.Tensor | None = None  # (B, Fc) int64 category hashes

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            move(self.input_ids),
            move(self.attention_mask),
            move(self.series),
            move(self.series_mask),
            self.labels.to(device, non_blocking=True),
            move(self.numeric),
            move(self.categorical),
        )

    def inputs(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments of HybridFinGPT.forward."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "series": self.series,
            "series_mask": self.series_mask,
            "numeric": self.numeric,
            "categorical": self.categorical,
        }

    def __len__(self) -> int:
        return len(self.labels)


class EncodedBank(Dataset):
    """A BankDataset with its texts tokenised (truncated to `max_length`, special tokens added)."""

    def __init__(self, data: BankDataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.token_ids = (
            None
            if data.texts is None
            else tokenizer(list(data.texts), truncation=True, max_length=max_length)["input_ids"]
        )
        self.series = None if data.series is None else torch.tensor(data.series, dtype=torch.float32)
        self.mask = None if data.mask is None else torch.tensor(data.mask, dtype=torch.bool)
        self.labels = torch.tensor(data.labels, dtype=torch.long)
        static = data.features
        self.numeric = None if static is None else torch.tensor(static.numeric, dtype=torch.float32)
        self.categorical = None if static is None else torch.tensor(static.categorical, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Item:
        empty = torch.empty(0)
        return (
            empty.long() if self.token_ids is None else torch.tensor(self.token_ids[i], dtype=torch.long),
            empty if self.series is None else self.series[i],
            empty.bool() if self.mask is None else self.mask[i],
            empty if self.numeric is None else self.numeric[i],
            empty.long() if self.categorical is None else self.categorical[i],
            self.labels[i],
        )


class Collator:
    """Stacks items into a Batch, padding token ids with the tokenizer's pad id."""

    def __init__(self, pad_id: int, has_text: bool, has_series: bool, has_features: bool = False) -> None:
        self.pad_id = pad_id
        self.has_text = has_text
        self.has_series = has_series
        self.has_features = has_features

    def __call__(self, items: list[Item]) -> Batch:
        ids, series, masks, numeric, categorical, labels = zip(*items, strict=True)
        input_ids = attention_mask = batch_series = series_mask = None
        if self.has_text:
            longest = max(len(t) for t in ids)
            input_ids = torch.full((len(ids), longest), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(ids), longest), dtype=torch.long)
            for row, tokens in enumerate(ids):
                input_ids[row, : len(tokens)] = tokens
                attention_mask[row, : len(tokens)] = 1
        if self.has_series:
            series_mask = torch.stack(masks)
            real_steps = series_mask.any(dim=0).nonzero()
            steps = int(real_steps.max()) + 1 if len(real_steps) else 1
            batch_series, series_mask = torch.stack(series)[:, :steps], series_mask[:, :steps]
        numbers = torch.stack(numeric) if self.has_features else None
        hashes = torch.stack(categorical) if self.has_features else None
        return Batch(input_ids, attention_mask, batch_series, series_mask, torch.stack(labels), numbers, hashes)


def make_loader(
    data: BankDataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader of Batches; shuffling is seeded so that a run can be repeated exactly."""
    collate = Collator(
        tokenizer.pad_token_id, data.texts is not None, data.series is not None, data.features is not None
    )
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        EncodedBank(data, tokenizer, max_length),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collate,
    )
