"""A small, deterministic supervised training loop: the teacher half of an offline-KD
experiment (``softlabels teacher fit``) and a reference the student trainers are compared with.

Adam with a cosine learning-rate decay to zero, cross-entropy on hard labels. Everything random
(shuffling, dropout if the model has any) is seeded from ``seed`` inside a forked RNG, so the
caller's global torch RNG state is untouched and two runs with the same seed on CPU give the
same weights. In-memory datasets (with ``.inputs``/``.targets``) are batched by indexing the
tensors; anything else goes through a ``DataLoader`` with a seeded generator.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import nn

from softlabels.datasets.info import in_memory
from softlabels.device import autocast_for
from softlabels.errors import SpecError
from softlabels.progress import EpochProgress

__all__ = ["fit_classifier", "evaluate_accuracy", "DEFAULT_LR"]

DEFAULT_LR = 1e-2


def _batches(dataset, batch_size: int, generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches, shuffled by ``generator`` when given. Both paths use the same
    permutation, so a dataset without ``.inputs`` trains exactly like its in-memory twin."""
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    tensors = in_memory(dataset)
    if tensors is not None:
        inputs, targets = tensors
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            yield inputs[index], targets[index]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=0)
    for x, y in loader:
        yield x, torch.as_tensor(y, dtype=torch.int64)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset, batch_size: int = 1024, device: torch.device | None = None) -> float:
    """Top-1 accuracy of ``model`` on a labelled dataset (eval mode; the mode is restored), on
    ``device`` (default: the CPU, full precision) under its autocast."""
    was_training = model.training
    model.eval()
    correct = total = 0
    device = device or torch.device("cpu")
    try:
        for x, y in _batches(dataset, batch_size, None):
            with autocast_for(device, training=True):
                pred = model(x.to(device, non_blocking=True)).argmax(dim=-1).cpu()
            correct += int((pred == y).sum())
            total += int(y.shape[0])
    finally:
        model.train(was_training)
    return correct / max(total, 1)


def _check_labelled(dataset, role: str) -> None:
    tensors = in_memory(dataset)
    if tensors is not None and bool((tensors[1] < 0).any()):
        raise SpecError(f"the {role} set is unlabeled (label -1); fit a classifier on a labelled split")


def check_training_args(*, epochs: int, batch_size: int, lr: float) -> None:
    """The loop settings every trainer (teacher fit, student train) validates the same way."""
    if epochs < 1:
        raise SpecError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise SpecError(f"batch size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise SpecError(f"learning rate must be > 0, got {lr}")


def fit_classifier(
    model: nn.Module,
    train_set,
    test_set,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 128,
    lr: float = DEFAULT_LR,
    progress: bool = True,
) -> dict:
    """Train ``model`` in place with cross-entropy; returns ``{"train_accuracy",
    "test_accuracy", "epochs", "seconds"}`` (accuracies measured in eval mode after training).
    The model is left in eval mode."""
    check_training_args(epochs=epochs, batch_size=batch_size, lr=lr)
    _check_labelled(train_set, "training")
    _check_labelled(test_set, "test")
    n = len(train_set)
    if n == 0:
        raise SpecError("the training set is empty")
    steps_per_epoch = -(-n // batch_size)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        with EpochProgress(progress, epochs, "fit", transient=True) as bar:
            for epoch in range(epochs):
                total_loss = 0.0
                for x, y in _batches(train_set, batch_size, generator):
                    loss = loss_fn(model(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    total_loss += float(loss.detach()) * y.shape[0]
                bar.update(epoch + 1, total_loss / n)
    model.eval()
    return {
        "train_accuracy": evaluate_accuracy(model, train_set),
        "test_accuracy": evaluate_accuracy(model, test_set),
        "epochs": epochs,
        "seconds": time.perf_counter() - start,
    }
