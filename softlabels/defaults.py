"""The student trainer's defaults, in a module without torch so that the CLI can show them in
``--help`` without importing the trainer (softlabels.train re-exports them)."""

#: The optimisation recipe's defaults (softlabels.recipe.Recipe's fields): the trainer's historical
#: Adam + cosine recipe, so runs on the built-in datasets are unchanged.
RECIPE_DEFAULTS = {
    "optimizer": "adam", "lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0, "schedule": "cosine",
    "warmup_epochs": 0.0, "decay_epochs": 30.0, "decay_rate": 0.1,
}

#: Trainer defaults (the method hyperparameters default to softlabels.losses', see LOSSES.md).
DEFAULTS = {"epochs": 60, "seed": 0, "batch_size": 128,
            **{key: RECIPE_DEFAULTS[key] for key in ("lr", "optimizer", "schedule")}}

#: Under torchrun: seconds a rank waits in a collective (an all-reduce, a barrier) before it gives
#: up. Rank 0 evaluates and checkpoints while the others wait at a barrier, so it must exceed that.
DIST_TIMEOUT = 600.0
