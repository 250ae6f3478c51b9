"""The dump worker's persistent, announced batch stream: every unit gets exactly its rows, in
order, whatever the announcements; decode workers persist and run ahead across units."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch

from softlabels.pipelines.predictor import BatchStream


class Rows(torch.utils.data.Dataset):
    """Item i = (row i with the decoding process's pid appended, label); counts reads in
    shared memory."""

    def __init__(self, n: int) -> None:
        self.data = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
        self.reads = multiprocessing.get_context("fork").Value("i", 0)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        with self.reads.get_lock():
            self.reads.value += 1
        return torch.cat([self.data[i], torch.tensor([float(os.getpid())])]), 0


def rows(stream: BatchStream, start: int, stop: int) -> torch.Tensor:
    return torch.cat([x for x, _ in stream.batches(start, stop)])


def unit(stream: BatchStream, start: int, stop: int) -> torch.Tensor:
    return rows(stream, start, stop)[:, :3]


def pids(stream: BatchStream, start: int, stop: int) -> set[int]:
    return {int(p) for p in rows(stream, start, stop)[:, 3]}


@pytest.mark.parametrize("workers", [0, 1])
def test_announced_units_come_out_exactly(workers):
    data = Rows(50)
    stream = BatchStream(data, batch_size=4, workers=workers, pin_memory=False)
    units = [(0, 10), (10, 20), (20, 30), (30, 50)]
    for r in units[:2]:
        stream.announce(*r)
    got = []
    for i, (start, stop) in enumerate(units):
        if i + 2 < len(units):
            stream.announce(*units[i + 2])  # announced while the unit two ahead is computed
        got.append(unit(stream, start, stop))
        assert torch.equal(got[-1], data.data[start:stop])


def test_decode_workers_persist_and_run_ahead_across_units():
    data = Rows(40)
    stream = BatchStream(data, batch_size=5, workers=1, pin_memory=False)
    stream.announce(0, 10)
    stream.announce(10, 20)
    seen = pids(stream, 0, 10)
    time.sleep(1.0)  # the worker decodes ahead while "the teacher" works on the first unit
    assert data.reads.value > 10, "the next unit was not prefetched across the unit boundary"
    seen |= pids(stream, 10, 20)
    stream.announce(20, 40)
    seen |= pids(stream, 20, 40)
    assert len(seen) == 1 and os.getpid() not in seen  # one decode process for all units


def test_out_of_turn_and_abandoned_units_reset_the_stream():
    data = Rows(60)
    stream = BatchStream(data, batch_size=4, workers=1, pin_memory=False)
    for r in [(0, 12), (12, 24), (24, 36)]:
        stream.announce(*r)
    assert torch.equal(unit(stream, 12, 24), data.data[12:24])  # asked out of turn
    assert torch.equal(unit(stream, 0, 12), data.data[0:12])
    batches = stream.batches(24, 36)
    next(batches)
    batches.close()  # the consumer failed mid-unit (e.g. NaN logits): its other batches are in flight
    assert torch.equal(unit(stream, 24, 36), data.data[24:36])  # the retry gets the whole unit
    assert torch.equal(unit(stream, 36, 60), data.data[36:60])  # never announced
