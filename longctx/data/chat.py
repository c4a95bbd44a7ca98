"""The chat template, once for training and evaluation: a record -> prompt ids + target ids, under the length policy.

The conversation (system prompt when set, user = instruction + "\\n\\n" + document, assistant = summary) is rendered
once by the tokenizer's chat template with a placeholder in place of each content, and the rendered text is split at
the placeholders into template pieces and content pieces:

- Template pieces (`<|im_start|>user\\n`, `<|im_end|>\\n<|im_start|>assistant\\n`, an empty think block, ...) are
  tokenized with the tokenizer's added and special tokens recognised.
- Content pieces (system prompt, instruction, document, summary) are tokenized as plain text, by a copy of the
  tokenizer without its added tokens: a document holding the literal text `<|im_end|>`, `<|endoftext|>` or `<think>`
  gets the ids of that text, never a control token, so no record can end a turn early or fake one.
- prompt = every piece up to the assistant's content. Whatever a template puts between the generation prompt and the
  content (the release 2507 template's `<think>\\n\\n</think>\\n\\n`) is prompt, never labels.
- target = summary + the template's text after it, cut right after the end-of-turn token (the tokenizer's eos). The
  "\\n" a template writes after `<|im_end|>` is left out: evaluation stops at end of turn and never predicts it.

Training labels the target (longctx.data.dataset); evaluation generates from the same prompt ids
(longctx.eval.generation),
so the prompt the model learns to continue is the prompt it is given. A template for which the split cannot be made
(content dropped, transformed or repeated; no end of turn after the summary) is a ChatTemplateError when the run
starts, before any record is tokenized.

truncate_document cuts the document's own ids (each document is tokenized once): the longest prefix that fits and
ends on a character boundary (by the offsets mapping: a token sharing its character with the next token is inside a
multi-byte character). A sample then fills max_seq_length exactly, unless the cut falls inside a character that takes
several tokens (some CJK characters, emoji), which is left out whole: such a sample is that character's remaining
tokens (1 to 3) short.
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from dataclasses import dataclass

from ..errors import ChatTemplateError
from ..settings import DataArguments, ModelArguments
from .tokenizer import load_tokenizer

PLACEHOLDERS = {"system": "⟦longctx:system⟧", "user": "⟦longctx:user⟧", "assistant": "⟦longctx:assistant⟧"}
DOCUMENT_SEPARATOR = "\n\n"  # between the instruction and the document in the user turn
BUILTIN = "tokenizer"  # run_info / eval settings value when chat_template is unset
UNNAMED = "the tokenizer's chat template"  # how errors name a template when the caller gives no template_name
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_UNCLOSED_THINK = re.compile(r"^\s*<think>.*", re.DOTALL)  # reasoning cut off by max_new_tokens before </think>
_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its length, plain_text_tokenizer)


def template_name(model_args: ModelArguments) -> str:
    """How messages name the template in use."""
    if model_args.chat_template:
        return f"chat template {model_args.chat_template}"
    return (f"the built-in chat template of tokenizer "
            f"'{model_args.tokenizer_name_or_path or model_args.model_name_or_path}'")


def template_record(model_args: ModelArguments, tokenizer) -> dict[str, str]:
    """What run_info.json and the evaluation settings record: the template's path (or "tokenizer") and the sha256 of
    the template text in use, so a template changed by a new hub snapshot is seen."""
    return {"chat_template": model_args.chat_template or BUILTIN,
            "chat_template_sha256": hashlib.sha256(tokenizer.chat_template.encode("utf-8")).hexdigest()}


def check_template(model_args: ModelArguments, data: DataArguments) -> dict[str, str]:
    """Load the tokenizer and split its template once (ChatTemplateError when impossible); returns template_record.
    Runs when training or evaluation starts, before any record is tokenized or any weight loaded."""
    tokenizer = load_tokenizer(model_args)
    ChatFormat(tokenizer, data, template_name(model_args))
    return template_record(model_args, tokenizer)


def strip_reasoning(text: str) -> tuple[str, bool]:
    """(text without `<think>...</think>` blocks and without an unclosed leading `<think>` block, whether there was
    one). Scoring sees only the answer: a perfect summary after an empty think block scores as the summary."""
    stripped = _UNCLOSED_THINK.sub("", _THINK_BLOCK.sub("", text))
    return stripped.strip(), stripped != text


def plain_text_tokenizer(tokenizer):
    """A copy of the fast tokenizer's pipeline (normalizer, pre-tokenizer, model) without its added tokens: text in,
    the ids of that text out, never a special or added token. transformers' split_special_tokens leaves non-special
    added tokens (`<think>`, `<tool_call>`, `<|fim_prefix|>`) matched, hence the copy. Made once per tokenizer (and
    vocabulary size): copying a 151k-token vocabulary takes about a second."""
    from tokenizers import Tokenizer

    cached = _PLAIN.get(tokenizer)
    if cached and cached[0] == len(tokenizer):
        return cached[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ChatTemplateError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; the prompt / summary "
                                f"split needs one (AutoTokenizer gives one for every supported model).")
    spec = json.loads(backend.to_str())
    spec.update(added_tokens=[], truncation=None, padding=None)
    plain = Tokenizer.from_str(json.dumps(spec))
    _PLAIN[tokenizer] = (len(tokenizer), plain)
    return plain


@dataclass
class Sample:
    """One record under the length policy. action: keep, truncate (document cut) or drop."""

    prompt_ids: list[int]
    target_ids: list[int]
    action: str
    reason: str
    original_tokens: int
    document_tokens_removed: int


class ChatFormat:
    """The template split once into ids around the contents; `encode` then tokenizes a record's document and summary
    only. Picklable and deterministic to hash, so datasets.map caches what it produces."""

    def __init__(self, tokenizer, data: DataArguments, template: str = UNNAMED):
        self.max_seq_length, self.length_policy = data.max_seq_length, data.length_policy
        self.plain = plain_text_tokenizer(tokenizer)
        text = _render(tokenizer, data, template)
        roles = (["system"] if data.system_prompt else []) + ["user", "assistant"]
        for role in roles:
            count = text.count(PLACEHOLDERS[role])
            if count != 1:
                raise ChatTemplateError(
                    f"{template}: the {role} message's content appears {count} times in the rendered conversation "
                    f"instead of once, as given; the prompt / summary split needs every content written exactly "
                    f"once and unchanged. Use a template that does (set chat_template to a .jinja file).")
        starts = [text.index(PLACEHOLDERS[role]) for role in roles]
        if starts != sorted(starts):
            raise ChatTemplateError(f"{template}: the contents are rendered out of order ({', '.join(roles)} expected); "
                                    f"use a template that writes the messages in order (set chat_template).")
        pieces = re.split("(" + "|".join(re.escape(PLACEHOLDERS[role]) for role in roles) + ")", text)
        # pieces: template, placeholder, template, ..., placeholder (assistant), template after the summary
        head: list[int] = []
        for piece in pieces[:-3]:
            if piece == PLACEHOLDERS["system"]:
                head += self.plain_ids(data.system_prompt)
            elif piece == PLACEHOLDERS["user"]:
                head += self.plain_ids(data.instruction + DOCUMENT_SEPARATOR)
            else:
                head += _template_ids(tokenizer, piece)
        self.head = head  # up to the document
        self.middle = _template_ids(tokenizer, pieces[-3])  # after the document, up to the summary
        self.end_of_turn = _end_of_turn(tokenizer, pieces[-1], template)
        self._check_plain_text(tokenizer)

    def plain_ids(self, text: str) -> list[int]:
        return self.plain.encode(text, add_special_tokens=False).ids

    def encode(self, document: str, summary: str) -> Sample:
        """Prompt and target ids of one record under the length policy (the same for training and evaluation)."""
        encoding = self.plain.encode(document, add_special_tokens=False)
        document_ids = encoding.ids
        target = self.plain_ids(summary) + self.end_of_turn
        fixed = len(self.head) + len(self.middle) + len(target)
        total = fixed + len(document_ids)
        action, reason, keep = "keep", "", len(document_ids)
        if total > self.max_seq_length and self.length_policy == "drop":
            action, reason = "drop", "longer than max_seq_length"
        elif total > self.max_seq_length:
            cut = _character_boundary(encoding.offsets, self.max_seq_length - fixed)
            if cut > 0:
                action, reason, keep = "truncate", "document cut to fit max_seq_length", cut
            else:
                action, reason = "drop", "instruction + summary leave no room for the document in max_seq_length"
        prompt = self.head + document_ids[:keep] + self.middle
        removed = len(document_ids) - keep
        return Sample(prompt, target, action, reason, total, removed)

    def _check_plain_text(self, tokenizer) -> None:
        """Content must never become a control token: probe the plain-text tokenizer with every added token's text."""
        control = set(tokenizer.added_tokens_decoder)
        for token in tokenizer.added_tokens_decoder.values():
            produced = control & set(self.plain_ids(f"x {token.content} x"))
            if produced:
                raise ChatTemplateError(f"the tokenizer turns the plain text {token.content!r} into control token(s) "
                                        f"{sorted(produced)}; records could fake chat turns with it.")


def _render(tokenizer, data: DataArguments, template: str) -> str:
    import jinja2

    if not tokenizer.chat_template:
        raise ChatTemplateError(f"{template}: the tokenizer has no chat template; set chat_template to a .jinja file "
                                f"or use an instruct model's tokenizer.")
    messages = [{"role": "user", "content": PLACEHOLDERS["user"]},
                {"role": "assistant", "content": PLACEHOLDERS["assistant"]}]
    if data.system_prompt:
        messages.insert(0, {"role": "system", "content": PLACEHOLDERS["system"]})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"{template}: rendering a conversation failed: {err}") from err


def _template_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _end_of_turn(tokenizer, suffix: str, template: str) -> list[int]:
    """The template's ids after the summary, up to and including the end-of-turn token."""
    ids = _template_ids(tokenizer, suffix)
    eos = tokenizer.eos_token_id
    if eos is None or eos not in ids:
        raise ChatTemplateError(f"{template}: the text after the assistant's content ({suffix!r}) holds no "
                                f"end-of-turn token (the tokenizer's eos_token {tokenizer.eos_token!r}), so the model "
                                f"would never learn to stop; use a template that ends the assistant turn with it.")
    return ids[:ids.index(eos) + 1]


def _character_boundary(offsets: list[tuple[int, int]], budget: int) -> int:
    """The largest k <= budget such that the first k tokens end on a character boundary (k = 0 when none)."""
    k = min(budget, len(offsets))
    while 0 < k < len(offsets) and offsets[k][0] < offsets[k - 1][1]:  # token k shares a character with token k-1
        k -= 1
    return max(k, 0)
