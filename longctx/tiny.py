"""Build the embedded default's assets locally: a BPE tokenizer with a chat template, a tiny random-init Qwen3,
and a deterministic synthetic corpus of long legal-style case files with short summaries. No downloads.

    python -m longctx.tiny --output_dir .cache/tiny_smoke

Writes OUTPUT_DIR/model (tokenizer + model), OUTPUT_DIR/data/{train,validation}.jsonl. Building again with the
same settings is a no-op; the directory appears whole or not at all.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import random
import shutil
import tempfile
from pathlib import Path

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VERSION = 2  # bump when the corpus, tokenizer or model recipe changes, so cached assets are rebuilt

COURTS = ["District Court of Northvale", "High Court of Eastmere", "Court of Appeal of Westbrook",
          "Commercial Court of Southport", "County Court of Ashford", "Superior Court of Redfield"]
PARTIES = ["Acme Holdings", "Birch Logistics", "Cobalt Mining", "Delta Foods", "Elm Street Bakery",
           "Falcon Airlines", "Granite Insurance", "Harbor Shipping", "Ivory Textiles", "Juniper Farms",
           "Kestrel Software", "Lantern Hotels", "Maple Builders", "Nimbus Energy"]
CLAIMS = ["breach of contract", "unpaid invoices", "negligence", "breach of lease", "copyright infringement",
          "wrongful dismissal", "defective goods", "unfair competition"]
AMOUNTS = ["5000", "12000", "25000", "40000", "75000", "90000", "150000", "300000"]
FILLER = [
    "The parties were represented by counsel throughout the proceedings.",
    "The court reviewed the written submissions filed by both sides.",
    "A case management conference was held and a timetable was fixed.",
    "Disclosure of documents was completed within the agreed period.",
    "Witness statements were exchanged and the hearing was listed.",
    "The expert reports addressed the accounting records in detail.",
    "Counsel made oral submissions on the relevant authorities.",
    "The court considered the chronology of correspondence between the parties.",
    "An application to amend the pleadings was granted without objection.",
    "The hearing lasted three days and judgment was reserved.",
    "The bundle of documents ran to several hundred pages.",
    "Neither party sought an adjournment of the trial.",
    "The court noted that the procedural rules had been followed.",
    "Costs budgets were approved at an earlier hearing.",
    "Settlement discussions took place but did not resolve the dispute.",
    "The court heard evidence from the finance director.",
]


def make_case(rng: random.Random, index: int, paragraphs: int) -> dict[str, str]:
    """One case file whose summary needs facts from its beginning, middle and end."""
    court, claim, amount = rng.choice(COURTS), rng.choice(CLAIMS), rng.choice(AMOUNTS)
    plaintiff, defendant = rng.sample(PARTIES, 2)
    winner = rng.choice(["plaintiff", "defendant"])

    def filler(n: int) -> list[str]:
        return [" ".join(rng.choice(FILLER) for _ in range(4)) for _ in range(n)]

    third = max(1, paragraphs // 3)
    body = [f"CASE FILE {index:05d}. Proceedings before the {court}.",
            f"The claim was brought by {plaintiff}, the plaintiff."]
    body += filler(third)
    body += [f"The defendant is {defendant}. The plaintiff alleges {claim}."]
    body += filler(third)
    outcome = (f"The court found for the {winner} and awarded {amount} dollars." if winner == "plaintiff"
               else f"The court found for the {winner} and dismissed the claim of {amount} dollars.")
    body += filler(third) + [f"JUDGMENT. {outcome}"]
    summary = f"{plaintiff} sued {defendant} for {claim} before the {court}. {outcome}"
    return {"id": f"case-{index:05d}", "document": "\n\n".join(body), "summary": summary}


def make_corpus(num_train: int, num_validation: int, seed: int = 0, num_long: int = 2):
    """Deterministic splits; the first num_long training cases are much longer than the rest (length policy)."""
    rng = random.Random(seed)
    train = [make_case(rng, i, paragraphs=40 if i < num_long else rng.randint(8, 16)) for i in range(num_train)]
    validation = [make_case(rng, 100000 + i, paragraphs=rng.randint(8, 16)) for i in range(num_validation)]
    return train, validation


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def tiny_qwen3(tokenizer, hidden_size: int = 128, num_layers: int = 2, seed: int = 0):
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        max_position_embeddings=8192, tie_word_embeddings=True, use_cache=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id],
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model


def pretrain(model, tokenizer, texts: list[str], epochs: int = 3, lr: float = 3e-3, seq_len: int = 512,
             seed: int = 0) -> float:
    """A few epochs of plain next-token training on the documents, so the base knows the domain's words the way
    a real pretrained model does; LoRA then has to learn the summarisation itself. Returns the last loss."""
    import torch

    ids = [t for text in texts for t in tokenizer(text + tokenizer.eos_token)["input_ids"]]
    blocks = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        for batch in blocks[torch.randperm(len(blocks), generator=generator)].split(8):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def build(output_dir: str | Path, num_train: int = 160, num_validation: int = 12, vocab_size: int = 1024,
          hidden_size: int = 128, num_layers: int = 2, seed: int = 0) -> Path:
    output_dir = Path(output_dir)
    recipe = {"version": VERSION, "num_train": num_train, "num_validation": num_validation,
              "vocab_size": vocab_size, "hidden_size": hidden_size, "num_layers": num_layers, "seed": seed}
    marker = output_dir / "recipe.json"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(output_dir.parent / f".{output_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two launches (or test workers) at once: one builds, the other waits
        if marker.is_file() and json.loads(marker.read_text()) == recipe:
            return output_dir
        return _build(output_dir, recipe, num_train, num_validation, vocab_size, hidden_size, num_layers, seed)


def _build(output_dir: Path, recipe: dict, num_train: int, num_validation: int, vocab_size: int, hidden_size: int,
           num_layers: int, seed: int) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=output_dir.parent))
    try:
        train, validation = make_corpus(num_train, num_validation, seed)
        (tmp / "data").mkdir()
        for name, rows in (("train", train), ("validation", validation)):
            with (tmp / "data" / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        texts = [r["document"] + "\n" + r["summary"] for r in train]
        tokenizer = train_tokenizer(texts, vocab_size)
        model = tiny_qwen3(tokenizer, hidden_size, num_layers, seed)
        pretrain(model, tokenizer, [r["document"] for r in train], seed=seed)
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        (tmp / "recipe.json").write_text(json.dumps(recipe))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp.replace(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Where model/ and data/ are written.")
    parser.add_argument("--num_train", type=int, default=160)
    parser.add_argument("--num_validation", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build(args.output_dir, num_train=args.num_train, num_validation=args.num_validation, seed=args.seed)
    print(f"tiny assets ready in {path}", flush=True)


if __name__ == "__main__":
    main()
