"""Score every checkpoint of a run with ROUGE: base model loaded once, resumable, data parallel, with a report.

    bash experiments/009_text_summary/eval_all_checkpoints.sh                  # every complete checkpoint of OUTPUT_DIR
    bash experiments/009_text_summary/eval_all_checkpoints.sh --follow         # ... and each new one, as saved
    NUM_PROCESSES=4 bash experiments/009_text_summary/eval_all_checkpoints.sh  # 4 GPUs share the validation set
    python experiments/009_text_summary/eval_checkpoint.py --config runs/009_text_summary/run_config.yaml \\
        --checkpoint runs/009_text_summary/checkpoint-200                      # one checkpoint
    python -m longctx.eval --config ... --run_dir ... --all_checkpoints        # the same command line

One invocation loads the tokenizer, the validation prompts and the base model once; each checkpoint's LoRA adapter is
then loaded, made active, used and deleted (peft load_adapter / set_adapter / delete_adapter). Each validation
record's training prompt (longctx.chat: the chat template up to the summary, the same ids training used) is generated
from greedily: prompts sorted by length (longest first, so an out-of-memory shows at once) into batches of
generation_batch_size, left padded, up to max_new_tokens, stopping at EOS; reasoning blocks (<think>...</think>) are
removed from the predictions before scoring. With several processes (accelerate launch), the batches are dealt out round-robin,
each process generates its own and the shares are merged in prompt order: the same batches as one process, so the
same predictions. When one process fails (loading, generating, writing), every process stops at the next point where
they meet, and rank 0 prints one line naming the failed rank and the reason.

Resumable and idempotent: a checkpoint that OUTPUT_DIR/eval_results.jsonl already holds with the same
eval_fingerprint (content hash of the validation file + prompt, model and generation settings) is skipped; --force
scores it again and replaces its row. A row is written by rewriting the file beside and renaming it over the old one,
so a run killed at any moment leaves whole rows only, and rerunning scores the rest. Rows carry ROUGE F-measures as
fractions with 95% bootstrap intervals (<metric>_low / <metric>_high), the counts of empty predictions, of those with
a reasoning block removed and of those stopped by max_new_tokens, the references longer than max_new_tokens (warned
about before generating), and the generation settings. Predictions go to CHECKPOINT/eval_predictions.jsonl. Afterwards longctx.report writes
eval_summary.md, rouge_by_step.png / .csv, loss_curve.png / .csv and the best_checkpoint link into OUTPUT_DIR.

Modules, one job each:
  generation.py  prompts, batching, greedy generation with the data-parallel split, adapter swapping, Evaluator
  results.py     the results store: settings + fingerprint, reading / writing rows (locked, atomic), predictions
  ranks.py       the status every collective carries, so one rank's failure stops all of them at once
  wandb_log.py   ROUGE per checkpoint to W&B against the training step
  job.py         the evaluation's settings and the checks that need no weights: the command line -> an EvalJob
  scoring.py     what to score now (pending_checkpoints), the loop over checkpoints (score_all), results rows, report
  cli.py         main and --preflight
Checkpoint discovery is longctx.checkpoints'; tables and plots are longctx.report's.
"""
