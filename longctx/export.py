"""Export a trained adapter as a plain model: merged into the base weights (peft's merge_and_unload) in the base
model's dtype, with the run's tokenizer and pinned chat template, so that transformers, vLLM and SGLang load it without
this repository or peft.

    python -m longctx.export --run_dir runs/009_text_summary --checkpoint checkpoint-400 --output exports/009-400
    python -m longctx.export --run_dir runs/009_text_summary --average checkpoint-400 checkpoint-450 final_adapter \\
        --output exports/009-avg
    python -m longctx.export --run_dir runs/009_text_summary --average_last 3 --output exports/009-avg3

Run it from the repository root, like the launchers: the run's settings (RUN_DIR/run_config.yaml) name the base
model, the chat template and the validation file by paths from there.

The output directory: config.json (the base model's, YaRN included when the run set rope_yarn_factor),
generation_config.json (the base model's, ending at the end-of-turn tokens evaluation stops at),
model.safetensors or model-0000k-of-0000n.safetensors + model.safetensors.index.json, the tokenizer files with the
run's chat template (chat_template.jinja), and manifest.json, written last: the source run, checkpoint (or the
average's members), step, base model, dtype, chat template and prompt settings, the verification's numbers, and the
size and sha256 of every file.

Every check that needs no weights runs first, and a mistake is one line `error: ...` and exit 2: the run, the
checkpoint (complete per its manifest), the members of an average (longctx.model.averaging), the output (absent or an
empty directory), the disk space, the chat template (the one the run trained with). Then everything is written into a
temporary directory beside the output, verified, and renamed into place: the output is absent or whole.

Verification, before the rename: the written directory is loaded back with plain
`AutoModelForCausalLM.from_pretrained`, and its logits on a probe prompt (the run's training prompt of the first
validation record, at most 256 tokens) are compared with those of the base model + adapter as evaluation scores it
(the adapter in the base dtype); then 32 greedy tokens. Tolerance: |difference| <= rtol x the largest |logit|, with
rtol by dtype (`LOGIT_RTOL`). Why these: merged and separate compute the same function with different roundings: the
merged weight W + s B A is rounded to the dtype once, where the separate path rounds W x and s B (A x) apart and adds
them, and every matmul sums in its own order; a few units in the last place per layer, accumulating over the layers.
Measured on random Qwen3 models with rank-16 LoRA on every linear layer, 2 to 36 layers: the largest difference was
1.3e-6 to 1.8e-6 of the largest logit in float32, 1.7% to 3.1% in bfloat16. float32: 2^-16 (1.5e-5, 8x the
36-layer figure: summation order dominates there, not the weight rounding); bfloat16: 2^-4 (6.25%: 8 units in the last
place of its 8-bit significand, 2x the 36-layer figure); float16: 2^-7 (its significand has 3 bits more).
`--logit_rtol` overrides it (recorded in the manifest). The greedy tokens must be the same, except from a step where
the reference's two best logits are within the tolerance (a tie at this precision, reported). A failure exits 1 with
one line, and nothing is written.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from . import exit_status
from .config import SettingsParser, parse_config, refuse_unknown_flags, validate_chat_template
from .data.chat import ChatFormat, template_name, template_record
from .data.tokenizer import load_tokenizer
from .errors import ConfigError, DataError
from .model import averaging
from .model.loading import load_base_model, resolve_attn_implementation, resolve_dtype
from .run import checkpoints
from .run.checkpoints import Checkpoint
from .run.directory import git_state
from .run.layout import MANIFEST, RUN_CONFIG, RUN_INFO
from .settings import DATACLASSES, DataArguments, GenerationArguments, ModelArguments
from .utils.disk import free_bytes, human_bytes, is_disk_full
from .utils.distributed import print0
from .utils.hashing import sha256_file
from .utils.warning_filters import silence_unactionable_warnings

LOGIT_RTOL = {torch.float32: 2**-16, torch.bfloat16: 2**-4, torch.float16: 2**-7}  # why: the module docstring
PROBE_TOKENS = 256  # the probe prompt's length at most: enough to pass every layer, cheap for a 4B model on a CPU
GREEDY_TOKENS = 32
PROBE_DOCUMENT = ("The plaintiff appeals from a judgment of the district court dismissing her complaint for failure "
                  "to state a claim. The court held that the contract was unambiguous and that the defendant had "
                  "not breached it. We affirm in part, reverse in part, and remand for further proceedings.")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass
class ExportArguments:
    """python -m longctx.export --run_dir RUN --checkpoint NAME --output DIR (or --average / --average_last)."""

    run_dir: str = field(metadata={"help": "The training run (its OUTPUT_DIR, with run_config.yaml)."})
    output: str = field(metadata={"help": "The directory to write; absent or empty. Written whole or not at all."})
    checkpoint: str | None = field(
        default=None, metadata={"help": "The checkpoint to export: checkpoint-N or final_adapter of run_dir."})
    average: list[str] | None = field(
        default=None, metadata={"help": "Export the exact average of these checkpoints' LoRA updates instead, e.g. "
                                        "checkpoint-400 checkpoint-450 final_adapter (longctx/model/averaging.py)."})
    average_last: int | None = field(
        default=None, metadata={"help": "Export the exact average of the run's last K complete checkpoints (one per "
                                        "step: final_adapter only where no checkpoint-N has its step)."})
    logit_rtol: float | None = field(
        default=None, metadata={"help": "Verification tolerance: largest |logit difference| allowed, as a fraction "
                                        "of the largest |logit|. Unset: by dtype, 2^-16 float32, 2^-4 bfloat16, "
                                        "2^-7 float16 (why: longctx/export.py)."})
    max_shard_size: str = field(
        default="5GB", metadata={"help": "Largest safetensors shard (transformers' save_pretrained)."})


@dataclass
class Source:
    """What is exported: one checkpoint's adapter, or an average of several."""

    name: str  # checkpoint-400, final_adapter, average-400+450+474
    global_step: int
    checkpoint: Checkpoint | None = None
    members: list[averaging.Member] = field(default_factory=list)

    @property
    def is_average(self) -> bool:
        return bool(self.members)


@dataclass
class Verification:
    probe_tokens: int
    probe_source: str
    dtype: str
    rtol: float
    largest_logit: float
    tolerance: float
    max_abs_logit_diff: float
    adapter_effect: float  # max |logit| change the adapter itself makes on the probe: the scale a wrong merge shows
    reference_tokens: list[int]
    merged_tokens: list[int]
    tie_at: int | None = None  # first differing greedy step, where the reference's two best logits tie (within tol)
    tie_margin: float | None = None
    chat_prompt_matches_training: bool | None = None

    @property
    def logits_ok(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance

    @property
    def tokens_ok(self) -> bool:
        return self.reference_tokens == self.merged_tokens or self.tie_at is not None

    def line(self) -> str:
        same = (f"the same {len(self.reference_tokens)} greedy tokens" if self.reference_tokens == self.merged_tokens
                else f"greedy tokens equal up to step {self.tie_at}, where the reference's two best logits are "
                     f"{self.tie_margin:.3g} apart (within the tolerance: a tie at this precision)")
        return (f"verified: max |logit difference| {self.max_abs_logit_diff:.3g} <= tolerance {self.tolerance:.3g} "
                f"(rtol {self.rtol:.3g} x the largest |logit| {self.largest_logit:.3g}, {self.dtype}) on a "
                f"{self.probe_tokens}-token probe ({self.probe_source}); the adapter itself moves the logits by up to "
                f"{self.adapter_effect:.3g}; {same}")


# ---- checks before any weight ------------------------------------------------------------------------------------

def parse_arguments(argv: list[str]) -> ExportArguments:
    parser = SettingsParser([ExportArguments], description=__doc__.split("\n\n")[0])
    args, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    refuse_unknown_flags(parser, remaining)
    return args


def run_settings(run_dir: Path) -> tuple[ModelArguments, DataArguments, GenerationArguments]:
    config = run_dir / RUN_CONFIG
    if not config.is_file():
        raise ConfigError(f"setting 'run_dir' = {str(run_dir)!r}: no {RUN_CONFIG} there; point --run_dir at a "
                          f"training run's OUTPUT_DIR.")
    every = {f.name for cls in DATACLASSES for f in dataclasses.fields(cls)}
    (model, data, generation), _, _ = parse_config(["--config", str(config)],
                                                   (ModelArguments, DataArguments, GenerationArguments),
                                                   tolerated_keys=every)
    validate_chat_template(model)
    return model, data, generation


def choose_source(args: ExportArguments, run_dir: Path) -> Source:
    """The checkpoint or the average's members, checked complete and compatible; ConfigError otherwise."""
    given = [name for name in ("checkpoint", "average", "average_last") if getattr(args, name) is not None]
    if len(given) != 1:
        which = " and ".join(f"'{name}'" for name in given)
        raise ConfigError(f"settings {which} exclude each other: give one of them." if given else
                           "setting 'checkpoint' is unset: give --checkpoint NAME (e.g. final_adapter), "
                           "--average NAME NAME ..., or --average_last K.")
    if args.checkpoint is not None:
        name = args.checkpoint
        checkpoint = checkpoints.complete_named(run_dir, name, "checkpoint", repr(name))
        return Source(name, checkpoint.global_step, checkpoint=checkpoint)
    if args.average is not None:
        chosen = averaging.named_checkpoints(run_dir, args.average, "average")
        setting = "average"
    else:
        found = checkpoints.find_checkpoints(run_dir, warn=lambda _: None)
        chosen = averaging.last_complete(found, args.average_last, run_dir)
        setting = "average_last"
    members = averaging.load_members(chosen, setting)
    return Source(averaging.average_name(members), members[-1].global_step, members=members)


def check_output(output: Path) -> None:
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise ConfigError(f"setting 'output' = {str(output)!r}: exists and is not a directory; choose a new directory.")
    if output.is_dir():
        entries = sorted(p.name for p in output.iterdir())
        if entries:
            raise ConfigError(f"setting 'output' = {str(output)!r}: not empty ({len(entries)} entries, e.g. "
                              f"{entries[0]}); choose a new directory, or remove it first.")


def base_dtype(model: ModelArguments) -> torch.dtype:
    """The dtype the base model's weights are stored in (its config), else the run's torch_dtype."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model.model_name_or_path, trust_remote_code=model.trust_remote_code)
    except OSError as err:  # not a local directory, not in the hub cache, and no way to download it
        reason = " ".join(str(err).split()).split(". ")[0]
        raise ConfigError(f"setting 'model_name_or_path' = {model.model_name_or_path!r}: its config cannot be loaded "
                          f"on this machine ({reason}); download the model here, or point model_name_or_path (in "
                          f"{RUN_CONFIG}) at a local directory.") from err
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else resolve_dtype(model.torch_dtype)


def check_space(model: ModelArguments, output: Path) -> None:
    """The base model's weight files (a local directory) must fit where the output goes: the merged model is as
    large."""
    local = Path(model.model_name_or_path)
    if not local.is_dir():
        return  # a hub id: its size is not known without the hub
    need = sum(p.stat().st_size for p in local.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    free, measured = free_bytes(output.parent)
    if free < need + 2**26:
        raise ConfigError(f"setting 'output' = {str(output)!r}: {measured} has {human_bytes(free)} free, the merged "
                          f"model needs about {human_bytes(need)} (the base model's weights); free space or export "
                          f"elsewhere.")


def check_trained_template(run_dir: Path, model: ModelArguments, tokenizer) -> dict[str, str]:
    """The chat template in use now must be the one the run trained with (its sha256 in run_info.json)."""
    record = template_record(model, tokenizer)
    try:
        trained = json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8")).get("chat_template_sha256")
    except (OSError, ValueError):
        trained = None
    if trained and trained != record["chat_template_sha256"]:
        raise ConfigError(f"{template_name(model)} (sha256 {record['chat_template_sha256'][:12]}) is not the template "
                          f"the run trained with (sha256 {trained[:12]} in {run_dir / RUN_INFO}); restore that "
                          f"template (each checkpoint holds a copy, chat_template.jinja) before exporting.")
    return record


@dataclass
class Probe:
    ids: list[int]  # the training prompt's ids
    source: str  # where its document came from
    data: DataArguments  # the prompt settings it was made with (max_seq_length: PROBE_TOKENS)
    document: str


def probe_prompt(tokenizer, data: DataArguments, model: ModelArguments) -> Probe:
    """The run's training prompt of the first validation record, its document cut to fit PROBE_TOKENS; of a fixed
    legal paragraph when the validation file is not here."""
    document, where = PROBE_DOCUMENT, "a fixed paragraph"
    if data.validation_file and Path(data.validation_file).is_file():
        from .data.dataset import load_records

        records = load_records(data.validation_file, "validation", 1, data.datasets_cache_dir)
        if len(records):
            document, where = records[0][data.document_field], f"the first record of {data.validation_file}"
    probe = dataclasses.replace(data, max_seq_length=PROBE_TOKENS, length_policy="truncate_document")
    sample = ChatFormat(tokenizer, probe, template_name(model)).encode(document, "")
    if sample.action == "drop":  # instruction + template alone fill PROBE_TOKENS: the whole prompt then
        probe = dataclasses.replace(data, max_seq_length=10**9)
        sample = ChatFormat(tokenizer, probe, template_name(model)).encode(document, "")
    return Probe(sample.prompt_ids, where, probe, document)


# ---- merging, writing, verifying ---------------------------------------------------------------------------------

@contextmanager
def workspace(output: Path):
    """A temporary directory beside `output` (same filesystem: the final rename is atomic), removed at the end."""
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@torch.no_grad()
def logits_of(model, ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()


@torch.no_grad()
def greedy(model, ids: list[int], stop_ids: list[int], pad_id: int | None) -> tuple[list[int], list[torch.Tensor]]:
    """GREEDY_TOKENS greedy tokens (fewer at an end-of-turn token) and each step's logits."""
    device = next(model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=GREEDY_TOKENS,
                         do_sample=False, num_beams=1, eos_token_id=stop_ids, pad_token_id=pad_id,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences[0, len(ids):].tolist(), [step[0].float().cpu() for step in out.logits]


def first_tie(reference: list[int], merged: list[int], steps: list[torch.Tensor], tolerance: float):
    """(step, margin) where the greedy tokens first differ, when the reference's two best logits there are within
    `tolerance` (either token is the greedy choice at this precision); None otherwise or when they agree."""
    for i, (a, b) in enumerate(zip(reference, merged)):
        if a != b:
            top = torch.topk(steps[i], 2).values
            margin = float(top[0] - top[1])
            return (i, margin) if margin <= tolerance else None
    return None


def generation_config_for(model, stop_ids: list[int], tokenizer):
    """The base model's generation config, ending at the end-of-turn tokens evaluation stops at."""
    config = model.generation_config
    config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    config.pad_token_id = tokenizer.pad_token_id
    return config


def chat_prompt_matches(tokenizer, data: DataArguments) -> bool:
    """Whether the exported chat template's generation prompt (what a server's chat endpoint sends) is the training
    prompt the model learnt to continue, for a conversation of the run's instruction + a fixed paragraph."""
    from .data.chat import DOCUMENT_SEPARATOR

    messages = [{"role": "user", "content": data.instruction + DOCUMENT_SEPARATOR + PROBE_DOCUMENT}]
    if data.system_prompt:
        messages.insert(0, {"role": "system", "content": data.system_prompt})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    training = ChatFormat(tokenizer, dataclasses.replace(data, max_seq_length=10**9)).encode(PROBE_DOCUMENT, "")
    return tokenizer(rendered, add_special_tokens=False)["input_ids"] == training.prompt_ids


def file_records(directory: Path) -> dict[str, dict]:
    return {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}


@dataclass
class Plan:
    """Everything an export needs, checked before any weight loads."""

    run_dir: Path
    output: Path
    model: ModelArguments
    data: DataArguments
    source: Source
    tokenizer: object  # the run's, with its pinned chat template
    template: dict[str, str]  # chat_template, chat_template_sha256
    probe: Probe
    dtype: torch.dtype
    rtol: float
    device: torch.device
    max_shard_size: str

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


@dataclass
class Reference:
    """Base + adapter on the probe, as evaluation scores it: the logits, the adapter's own effect on them, the
    greedy tokens and each greedy step's logits, the stop tokens."""

    logits: torch.Tensor
    effect: float
    tokens: list[int]
    steps: list[torch.Tensor]
    stop_ids: list[int]


def plan_export(args: ExportArguments) -> Plan:
    """Every check that needs no weights. Raises ConfigError / DataError (exit 2) naming the setting and the fix."""
    run_dir, output = Path(args.run_dir), Path(args.output)
    if not run_dir.is_dir():
        raise ConfigError(f"setting 'run_dir' = {str(run_dir)!r}: no such directory; point --run_dir at a training "
                          f"run's OUTPUT_DIR.")
    model, data, _ = run_settings(run_dir)
    source = choose_source(args, run_dir)
    check_output(output)
    if args.logit_rtol is not None and not 0 < args.logit_rtol < 1:
        raise ConfigError(f"setting 'logit_rtol' = {args.logit_rtol!r}: use a fraction between 0 and 1, or leave it "
                          f"unset for the dtype's tolerance.")
    tokenizer = load_tokenizer(model)
    template = check_trained_template(run_dir, model, tokenizer)
    probe = probe_prompt(tokenizer, data, model)
    dtype = base_dtype(model)
    check_space(model, output)
    rtol = args.logit_rtol if args.logit_rtol is not None else LOGIT_RTOL.get(dtype, 2**-4)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Plan(run_dir, output, model, data, source, tokenizer, template, probe, dtype, rtol, device,
                args.max_shard_size)


def merge_into(plan: Plan, adapter: Path, target: Path) -> Reference:
    """Base + adapter in the base dtype (as evaluation scores it: longctx.eval.generation.AdapterSwapper) on the
    probe, then merged (peft's merge_and_unload) and written to `target` with the tokenizer."""
    from peft import PeftModel

    from .eval.generation import stop_token_ids

    base_args = dataclasses.replace(plan.model, torch_dtype=plan.dtype_name)
    base = load_base_model(base_args, training=False).to(plan.device).eval()
    stop_ids = stop_token_ids(plan.tokenizer, base)
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False, autocast_adapter_dtype=False).eval()
    logits = logits_of(model, plan.probe.ids)
    with model.disable_adapter():
        effect = float((logits_of(model, plan.probe.ids) - logits).abs().max())
    tokens, steps = greedy(model, plan.probe.ids, stop_ids, plan.tokenizer.pad_token_id)
    merged = model.merge_and_unload()
    merged.generation_config = generation_config_for(merged, stop_ids, plan.tokenizer)
    merged.save_pretrained(target, safe_serialization=True, max_shard_size=plan.max_shard_size)
    plan.tokenizer.save_pretrained(target)
    del merged, model, base
    gc.collect()
    return Reference(logits, effect, tokens, steps, stop_ids)


def verify(plan: Plan, target: Path, reference: Reference) -> Verification:
    """The written directory loaded back as anyone would (plain transformers, the dtype its files say) against the
    reference: logits within the tolerance, the same greedy tokens (but for a tie), the tokenizer giving the
    training prompt. Raises VerificationFailed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attn = resolve_attn_implementation(plan.model.attn_implementation)
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype="auto", attn_implementation=attn).to(plan.device)
    reloaded.eval()
    if reloaded.dtype != plan.dtype:
        raise VerificationFailed(f"the written model loads as {reloaded.dtype}, not {plan.dtype}")
    logits = logits_of(reloaded, plan.probe.ids)
    tokens, _ = greedy(reloaded, plan.probe.ids, reference.stop_ids, plan.tokenizer.pad_token_id)
    del reloaded
    gc.collect()
    largest = float(reference.logits.abs().max())
    check = Verification(len(plan.probe.ids), plan.probe.source, plan.dtype_name, plan.rtol, largest,
                         plan.rtol * largest, float((logits - reference.logits).abs().max()), reference.effect,
                         reference.tokens, tokens)
    tie = first_tie(reference.tokens, tokens, reference.steps, check.tolerance)
    if tie:
        check.tie_at, check.tie_margin = tie
    if not check.logits_ok:
        raise VerificationFailed(f"max |logit difference| {check.max_abs_logit_diff:.3g} > tolerance "
                                 f"{check.tolerance:.3g} (rtol {plan.rtol:.3g} x the largest |logit| {largest:.3g}, "
                                 f"{check.dtype}; the adapter itself moves the logits by up to {reference.effect:.3g})")
    if not check.tokens_ok:
        raise VerificationFailed(f"greedy tokens differ: base + adapter {reference.tokens}, merged {tokens}")
    saved = AutoTokenizer.from_pretrained(target)
    if saved.chat_template != plan.tokenizer.chat_template:
        raise VerificationFailed("the written tokenizer's chat template is not the run's")
    if ChatFormat(saved, plan.probe.data).encode(plan.probe.document, "").prompt_ids != plan.probe.ids:
        raise VerificationFailed("the written tokenizer does not give the training prompt's ids")
    check.chat_prompt_matches_training = chat_prompt_matches(saved, plan.data)
    return check


def manifest_of(plan: Plan, target: Path, reference: Reference, check: Verification, average: dict | None) -> dict:
    source, data = plan.source, plan.data
    return {
        "source_run": str(plan.run_dir.resolve()), "checkpoint": source.name, "global_step": source.global_step,
        **({"adapter_sha256": averaging.recorded_sha256(source.checkpoint.path)} if source.checkpoint else {}),
        **({"average": average} if average else {}),
        "base_model": plan.model.model_name_or_path, "dtype": check.dtype,
        **({"rope_yarn_factor": plan.model.rope_yarn_factor} if plan.model.rope_yarn_factor else {}),
        **plan.template,
        "prompt": {"system_prompt": data.system_prompt, "instruction": data.instruction,
                   "user_turn": "instruction + '\\n\\n' + document", "max_seq_length": data.max_seq_length},
        "generation_config": {"eos_token_id": reference.stop_ids, "pad_token_id": plan.tokenizer.pad_token_id,
                              "evaluated_with": "greedy (temperature 0)"},
        "verification": {**dataclasses.asdict(check), "logits_ok": check.logits_ok, "tokens_ok": check.tokens_ok},
        "git_commit": git_state().commit, "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": file_records(target),
    }


def export(args: ExportArguments) -> Path:
    """The recipe: checks -> (the average's adapter) -> merge and write -> verify -> manifest -> rename. Raises
    ConfigError / DataError before any weight loads, VerificationFailed when the written model does not reproduce
    base + adapter; the output is then untouched."""
    plan = plan_export(args)
    source = plan.source
    with workspace(plan.output) as work:
        adapter, average = (source.checkpoint.path if source.checkpoint else work / "average"), None
        if source.is_average:
            report = averaging.write_average(source.members, adapter, git_state().commit)
            average = averaging.average_record(source.members, report)
            print0(averaging.describe(source.members, report))
        print0(f"exporting {source.name} (step {source.global_step}) of {plan.run_dir}: "
               f"{plan.model.model_name_or_path} in {plan.dtype_name} + the adapter, merged, on {plan.device.type}")
        target = work / "model"
        reference = merge_into(plan, adapter, target)
        check = verify(plan, target, reference)
        print0(check.line())
        if not check.chat_prompt_matches_training:
            print0("warning: the chat template's generation prompt for a conversation of instruction + document is not "
                   "the training prompt; serve it through a completions endpoint with the training prompt "
                   "(manifest.json: prompt) rather than a chat endpoint.", file=sys.stderr)
        (target / MANIFEST).write_text(json.dumps(manifest_of(plan, target, reference, check, average), indent=1),
                                       encoding="utf-8")
        averaging.readable(target)
        os.replace(target, plan.output)  # over an empty output directory too; never half-written
    return plan.output


class VerificationFailed(RuntimeError):
    """The written model does not reproduce base + adapter: nothing is written."""


def main(argv: list[str] | None = None) -> None:
    silence_unactionable_warnings()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # peft imports DeepSpeed, which warns when it finds no GPU
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one line per stage instead of progress bars
    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        args = parse_arguments(argv)
        output = export(args)
    except (ConfigError, DataError) as err:
        print0(f"error: {err}", file=sys.stderr)
        sys.exit(exit_status.BAD_INPUT)
    except VerificationFailed as err:
        print0(f"error: verification failed: {err}; nothing was written to {args.output}.", file=sys.stderr)
        sys.exit(exit_status.FAILED)
    except Exception as err:
        if args is not None and is_disk_full(err, Path(args.output).parent):
            print0(f"error: {Path(args.output).parent} is full ({human_bytes(free_bytes(Path(args.output).parent)[0])} "
                   f"free); nothing was written to {args.output}: free space or export elsewhere.", file=sys.stderr)
            sys.exit(exit_status.FAILED)
        raise
    files = sorted(p.name for p in output.iterdir())
    print0(f"exported {output}: {', '.join(files)}")


if __name__ == "__main__":
    main()
