"""The stages of a working folder, one implementation for `igfiqa demo` and the reproduction study.

A working folder holds the synthetic data, its shards, the training runs and an MLflow store.
Every stage reuses what an earlier call finished (marker files, finished outputs), so both
the demo and the study resume where they stopped:

  work.py      the folder's layout (WorkFolder), stage records and clock, marker files
  data.py      synth, convert, bins, preview; and each data stage with its MLflow lineage run,
               as `igfiqa prep` runs it
  train.py     the training stage: on SLURM through submitit, or here when no cluster can run
  evaluate.py  the final checkpoint on the verification sets, logged as an MLflow child run
  efficacy.py  the model on fresh verification sets of an unseen seed
  matcher_spec.py, matchers.py
               the reference matchers: FR-only models on identities of their own seed, exported
               as ONNX and recorded in matchers.json (`build_matchers`)
"""
