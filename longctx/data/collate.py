"""Dynamic padding: each batch is padded to its own longest sample; labels are padded with -100.

Training batches are padded on the right and carry position_ids (0, 1, 2, ... in every row): under causal
attention no real token ever looks at a later position, so the padding needs no attention mask, and the loss
(longctx.model.loss) gives the model the positions instead of the mask. That keeps transformers from building a
(batch, 1, seq, seq) mask under SDPA (64 GiB at 262,144 tokens), and sequence parallelism needs position_ids in
every batch. Under sequence parallelism every batch is padded to a multiple of sequence_parallel_size (each rank
takes an equal slice); on CPU, where gloo's all_gather needs equal shapes on every rank, to one fixed length
(`pad_to_length`: longctx.model.sequence_parallel.collator_padding). Prompts for generation are padded on the left and
keep their attention mask: there it is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..labels import IGNORE_INDEX


@dataclass
class PadCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"
    pad_to_length: int | None = None  # every batch exactly this long (no sample is longer: max_seq_length)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_length:
            if longest > self.pad_to_length:
                raise ValueError(f"a sample of {longest} tokens is longer than pad_to_length {self.pad_to_length}")
            longest = self.pad_to_length
        elif self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids = list(f["input_ids"])
            labels = list(f["labels"]) if "labels" in f else None
            pad = longest - len(ids)
            rows = {
                "input_ids": (ids, self.pad_token_id),
                "attention_mask": ([1] * len(ids), 0),
                "labels": (labels, IGNORE_INDEX),
            }
            for key, (values, fill) in rows.items():
                if values is None:
                    continue
                padded = values + [fill] * pad if self.padding_side == "right" else [fill] * pad + values
                batch[key].append(padded)
        out = {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items() if rows}
        if self.padding_side == "right":
            out["position_ids"] = torch.arange(longest, dtype=torch.long).repeat(len(features), 1)
        return out
