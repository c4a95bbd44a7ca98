"""IGNORE_INDEX: the label of every position the loss skips (prompt, padding). torch's cross_entropy skips it by
default, and transformers' losses use the same value. A leaf, so that the data path, the collator, the loss and the
planner share it without importing each other."""

IGNORE_INDEX = -100
