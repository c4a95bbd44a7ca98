"""Score the base model and every checkpoint of a run with ROUGE (and, with --average / --average_last, the exact
average of several checkpoints' LoRA updates as one more row): base model loaded once, adapters swapped, resumable,
data parallel; the report answers whether fine-tuning helped, whether the best checkpoint is really better (paired
differences) and whether quality holds as prompts get longer.

    bash experiments/009_text_summary/eval_all_checkpoints.sh    # python -m longctx.eval --output_dir RUN_DIR ...

How evaluation works: docs/evaluation.md.

Modules, one job each:
  job.py            the evaluation's settings and the checks that need no weights: the command line -> an EvalJob
  generation.py     prompts, batching, greedy generation with the data-parallel split, adapter swapping
  metrics.py        ROUGE via rouge_score (+ bootstrap intervals), sentences split by nupunkt
  results.py        eval_results.jsonl and the predictions files (per-example records): fingerprint, locked writes
  analysis.py       paired bootstrap differences, bootstrap means, prompt-length buckets (pure functions, scipy)
  report.py         table, paired and length analysis, eval_summary.md, plots + their CSV, best_checkpoint
                    (python -m longctx.eval.report RUN_DIR)
  wandb_log.py      ROUGE per checkpoint to W&B against the training step, one key per scoring
  rank_failures.py  the status every collective carries, so one rank's failure stops all of them at once
  scoring.py        what to score now, the loop over checkpoints, results rows, the report
  cli.py            main and --preflight
"""
