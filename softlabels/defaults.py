"""The student trainer's defaults, in a module without torch so that the CLI can show them in
``--help`` without importing the trainer (softlabels.train re-exports them)."""

#: Trainer defaults (the method hyperparameters default to softlabels.losses', see LOSSES.md).
DEFAULTS = {"epochs": 60, "seed": 0, "batch_size": 128, "lr": 1e-2, "optimizer": "adam", "schedule": "cosine"}
