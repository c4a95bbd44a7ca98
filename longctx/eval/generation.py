"""Greedy generation from the validation prompts: one base model, adapters swapped, batches split over processes.

Prompts are the training prompts (longctx.data.chat.ChatFormat), sorted by length (longest first) into batches,
left padded; with several processes the batches are dealt out round-robin and the predictions merged back in prompt
order, so any process count gives one process's predictions. How evaluation works as a whole: docs/evaluation.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data.chat import UNNAMED, ChatFormat, plain_text_tokenizer, strip_reasoning, template_name
from ..data.collate import PadCollator
from ..data.dataset import load_records, record_id
from ..data.tokenizer import load_tokenizer
from ..errors import DataError
from ..model.loading import load_base_model, resolve_attn_implementation
from ..settings import DataArguments, GenerationArguments
from ..utils.distributed import print0
from . import rank_failures
from .results import BaseModel

if TYPE_CHECKING:
    from .job import EvalJob
    from .results import Scored


@dataclass
class Prompt:
    id: str
    input_ids: list[int]
    reference: str
    reference_tokens: int = 0  # the reference's training target: summary + end-of-turn token


@dataclass(frozen=True)
class Prediction:
    """One generated summary. `text` is what is scored and written as `prediction`; `raw` is the decoded output
    before reasoning blocks were removed."""

    text: str
    raw: str
    think_stripped: bool
    hit_max_new_tokens: bool  # stopped by max_new_tokens, not by an end-of-turn token


def build_prompts(tokenizer, data: DataArguments, template: str = UNNAMED) -> tuple[list[Prompt], int]:
    """Validation prompts: each record's training prompt ids (ChatFormat.encode of document + reference, under the
    length policy). Returns (prompts, number dropped for length)."""
    chat = ChatFormat(tokenizer, data, template)
    records = load_records(data.validation_file, "validation", data.max_eval_samples, data.datasets_cache_dir)
    prompts, dropped = [], 0
    for index, record in enumerate(records):
        reference = record[data.summary_field]
        sample = chat.encode(record[data.document_field], reference)
        if sample.action == "drop":
            dropped += 1
            continue
        prompts.append(Prompt(record_id(record, index, data, "validation"), sample.prompt_ids, reference,
                              len(sample.target_ids)))
    return prompts, dropped


def reference_lengths(prompts: list[Prompt], max_new_tokens: int) -> tuple[int, int]:
    """(references longer than max_new_tokens tokens, the max_new_tokens that covers 95% of them): the nearest-rank
    95th percentile of the reference lengths, the smallest length that at least 95% of them do not exceed."""
    lengths = sorted(p.reference_tokens for p in prompts)
    rank = -(-95 * len(lengths) // 100)  # ceil(0.95 n), in integers
    return sum(n > max_new_tokens for n in lengths), lengths[rank - 1]


def decode_prediction(tokenizer, new_ids: list[int], stop_ids: list[int]) -> Prediction:
    """The generated ids of one prompt -> Prediction. generate stops a row at a stop token or at max_new_tokens (a row
    finished early holds its stop token, then padding), so ids without any stop token reached max_new_tokens.
    skip_special_tokens drops `<|im_end|>` but keeps `<think>` (an added token, not a special one): hence the strip."""
    raw = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    text, think = strip_reasoning(raw)
    return Prediction(text, raw, think, set(stop_ids).isdisjoint(new_ids))


def stop_token_ids(tokenizer, model) -> list[int]:
    """EOS of the tokenizer and of the model's generation config (chat models often end turns with their own)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return sorted(ids)


def make_batches(prompts: list[Prompt], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped by length, longest first: little padding, and an out-of-memory shows in the first
    batch rather than hours in."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i].input_ids), i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def share_of_process(batches: list[list[int]], state) -> list[list[int]]:
    """This process's batches: every num_processes-th one, so each process gets long and short batches alike.
    `state`: accelerate's PartialState (None: one process)."""
    if state is None or state.num_processes == 1:
        return batches
    # split_between_processes hands out contiguous slices; laid out like this, process r's slice is batches[r::n].
    n = state.num_processes
    with state.split_between_processes([b for r in range(n) for b in batches[r::n]]) as mine:
        return list(mine)


def generated_tokens(new_ids: list[int], stop_ids: list[int]) -> int:
    """How many ids one row generated before its stop token (the stop token and the padding after it not counted):
    all of them when it reached max_new_tokens."""
    stops = set(stop_ids)
    return next((k for k, token in enumerate(new_ids) if token in stops), len(new_ids))


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[Prompt], batches: list[list[int]], generation: GenerationArguments,
                 stop_ids: list[int]) -> list[tuple[int, list[int]]]:
    """(prompt index, the ids generated after its prompt) for every prompt of `batches`: greedy, left padded, up to
    max_new_tokens; a row that stopped early holds its stop token, then padding. The one generate call of evaluation
    (generate_batches) and of longctx.summarize."""
    device = next(model.parameters()).device
    collate = PadCollator(tokenizer.pad_token_id, padding_side="left")
    out = []
    for chunk in batches:
        batch = collate([{"input_ids": prompts[i].input_ids} for i in chunk])
        output = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=generation.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        out += list(zip(chunk, output[:, batch["input_ids"].shape[1]:].tolist()))
    return out


def generate_batches(model, tokenizer, prompts: list[Prompt], batches: list[list[int]], generation: GenerationArguments,
                     stop_ids: list[int]) -> list[tuple[int, Prediction]]:
    """(prompt index, prediction) for every prompt of `batches`."""
    return [(i, decode_prediction(tokenizer, ids, stop_ids))
            for i, ids in generate_ids(model, tokenizer, prompts, batches, generation, stop_ids)]


def merge_in_order(pairs: list[tuple[int, Prediction]], num_prompts: int) -> list[Prediction]:
    """Predictions in prompt order from the (index, prediction) pairs of every process."""
    predictions: list[Prediction | None] = [None] * num_prompts
    for i, text in pairs:
        predictions[i] = text
    missing = [i for i, p in enumerate(predictions) if p is None]
    if missing:
        raise RuntimeError(f"{len(missing)} prompts got no prediction after merging the processes' shares")
    return predictions


def generate(model, tokenizer, prompts: list[Prompt], generation: GenerationArguments,
             stop_ids: list[int] | None = None) -> list[Prediction]:
    """Greedy predictions in the prompts' order, in this process alone."""
    stop_ids = stop_ids if stop_ids is not None else stop_token_ids(tokenizer, model)
    batches = make_batches(prompts, generation.generation_batch_size)
    return merge_in_order(generate_batches(model, tokenizer, prompts, batches, generation, stop_ids), len(prompts))


class AdapterSwapper:
    """One base model; each checkpoint's adapter is loaded, made the active one, and the previous one deleted, so
    the memory holds the base plus at most two adapters at any time."""

    def __init__(self, base):
        self.base = base
        self.model = None
        self.active: str | None = None
        self.loaded = 0

    def plain(self):
        """The base model without adapter: only before the first adapter is loaded (peft then wraps the base's
        layers), hence the base model is scored first."""
        if self.model is not None:
            raise RuntimeError("the base model must be scored before any adapter is loaded")
        return self.base

    def activate(self, path: str | Path):
        from peft import PeftModel

        name = f"adapter_{self.loaded}"  # unique: peft refuses to load a name twice
        self.loaded += 1
        # In the base model's dtype: peft's default (autocast_adapter_dtype) upcasts bf16 adapters to fp32, and the
        # LoRA path then computes in fp32 on a bf16 base: about 12 GiB more in one MLP of a 262,144-token prefill.
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name, is_trainable=False,
                                                   autocast_adapter_dtype=False)
        else:
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=False, autocast_adapter_dtype=False)
            self.model.set_adapter(name, inference_mode=True)
            self.model.delete_adapter(self.active)
        self.active = name
        return self.model.eval()


class Evaluator:
    """Per process: tokenizer, prompts and base model, loaded at the first checkpoint that needs scoring (a rerun
    with nothing to score loads nothing); then, per checkpoint, this process's share of the predictions."""

    def __init__(self, job: EvalJob, state, plan: Callable[[list[int]], None] | None = None):
        self.job, self.state = job, state
        self.plan = plan  # called with the prompts' token counts before the weights load; raises to refuse
        self.swapper: AdapterSwapper | None = None

    def load(self) -> None:
        if self.swapper is not None:
            return
        model, data, generation = self.job.model, self.job.data, self.job.generation
        self.tokenizer = load_tokenizer(model, padding_side="left")
        self.prompts, self.dropped = build_prompts(self.tokenizer, data, template_name(model))
        if not self.prompts:
            raise DataError(f"{data.validation_file}: no validation prompt fits max_seq_length="
                            f"{data.max_seq_length}; raise it or set length_policy: truncate_document.")
        self.references_over, self.reference_tokens_p95 = reference_lengths(self.prompts, generation.max_new_tokens)
        if self.references_over:
            print0(f"warning: {self.references_over} of {len(self.prompts)} validation references are longer than "
                   f"max_new_tokens={generation.max_new_tokens} tokens (summary + end of turn): their predictions "
                   f"are cut short, which lowers recall. max_new_tokens={self.reference_tokens_p95} would cover 95% "
                   f"of the references.", file=sys.stderr)
        if self.plan is not None:
            self.plan([len(p.input_ids) for p in self.prompts])
        base = load_base_model(model, training=False).to(self.state.device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer, base)
        self.generation_used = {  # the row's "generation": what decoding really used
            "max_new_tokens": generation.max_new_tokens, "generation_batch_size": generation.generation_batch_size,
            "decoding": "greedy", "stop_token_ids": self.stop_ids, "padding_side": "left",
            "dtype": str(base.dtype).replace("torch.", ""),
            "attn_implementation": resolve_attn_implementation(model.attn_implementation),
        }
        self.swapper = AdapterSwapper(base)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` by the run's tokenizer as plain text (no special token): how a prediction's and a
        reference's lengths are compared."""
        return len(plain_text_tokenizer(self.tokenizer).encode(text, add_special_tokens=False).ids)

    def _my_share(self, target: Scored) -> list[tuple[int, Prediction]]:
        self.load()
        model = self.swapper.plain() if isinstance(target, BaseModel) else self.swapper.activate(target.path)
        batches = share_of_process(make_batches(self.prompts, self.job.generation.generation_batch_size), self.state)
        return generate_batches(model, self.tokenizer, self.prompts, batches, self.job.generation, self.stop_ids)

    def predict(self, target: Scored) -> list[Prediction]:
        """Every process generates its share for a checkpoint (its adapter active) or the base model; every process
        receives all predictions in prompt order, or, when any process failed, raises RankFailed at the same moment
        as the others."""
        shares = rank_failures.gather(self.state, f"scoring {target.name}", lambda: self._my_share(target))
        return merge_in_order([pair for share in shares for pair in share], len(self.prompts))
