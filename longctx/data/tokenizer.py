"""The tokenizer of a run: loaded once from the model (or tokenizer_name_or_path), with the pinned chat template's
text when chat_template is set; a tokenizer that cannot be loaded is a one-line setting error."""

from __future__ import annotations

from pathlib import Path

from ..errors import ChatTemplateError, ConfigError
from ..settings import ModelArguments


def read_template(path: str | Path) -> str:
    """The template file's text, byte for byte (no newline translation), so its sha256 is the file's."""
    return Path(path).read_bytes().decode("utf-8")


def load_tokenizer(model: ModelArguments, padding_side: str = "right"):
    """The tokenizer, with the chat_template file's text as its template when that setting is given."""
    from transformers import AutoTokenizer

    source = model.tokenizer_name_or_path or model.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model.trust_remote_code)
    except OSError as err:  # not a local directory, not in the hub cache, and no way to download it
        setting = "tokenizer_name_or_path" if model.tokenizer_name_or_path else "model_name_or_path"
        reason = " ".join(str(err).split()).split(". ")[0]  # transformers' first sentence, on one line
        raise ConfigError(f"setting '{setting}' = {source!r}: its tokenizer cannot be loaded on this machine "
                          f"({reason}); download the model here (huggingface-cli download {source}), or point "
                          f"{setting} at a local directory.") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.chat_template:  # saved with the adapter (save_pretrained), so the adapter carries its template
        tokenizer.chat_template = read_template(model.chat_template)
    if tokenizer.chat_template is None:
        raise ChatTemplateError(f"tokenizer of '{model.model_name_or_path}' has no chat template; use an "
                                f"instruct model, set tokenizer_name_or_path to a tokenizer that has one, or set "
                                f"chat_template.")
    tokenizer.padding_side = padding_side
    return tokenizer
