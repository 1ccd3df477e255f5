"""Stored, training and serving bytes (issue 15, item 5)."""

import pytest
import torch

from embcompress.memory import MemoryReport, optimizer_state_bytes
from embcompress.tables import FullEmbedding, HashingEmbedding


def one_step(table, optimizer):
    ids = torch.tensor([[0, 1], [3, 2]])
    table(ids).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("make, moments", [
    (lambda p: torch.optim.Adam(p, lr=0.01), 2),
    (lambda p: torch.optim.Adagrad(p, lr=0.01), 1),
    (lambda p: torch.optim.SGD(p, lr=0.01), 0),
])
def test_training_bytes_count_the_optimizer_state_off_the_optimizer(make, moments):
    table = HashingEmbedding([100, 50], 8, num_buckets=16)
    opt = make(table.parameters())
    one_step(table, opt)
    report = table.memory_report([opt])
    weight = table.weight.numel() * 4
    step = 4 if moments else 0  # Adam and Adagrad keep a float32 step counter per parameter
    assert report.optimizer_state_bytes == moments * weight + step
    assert report.training_bytes == report.total_bytes + report.optimizer_state_bytes
    assert report.serving_bytes == report.total_bytes  # a hashing table serves as it trains


def test_only_the_tables_own_parameters_are_counted():
    table = FullEmbedding([10, 20], 4)
    other = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam([*table.parameters(), *other.parameters()], lr=0.01)
    (table(torch.tensor([[1, 2]])).sum() + other(torch.ones(1, 4)).sum()).backward()
    opt.step()
    assert optimizer_state_bytes([opt], table.parameters()) == {"float32": 2 * 30 * 4 * 4 + 4}


def test_the_ratio_is_baseline_over_serving_bytes():
    report = MemoryReport(parameters={"float32": 1000}, baseline_bytes=4000, serving=100)
    assert report.total_bytes == 1000 and report.serving_bytes == 100 and report.ratio == 40
    assert "serving 100" in str(report) and "ratio 40.00x" in str(report)
    assert report.as_dict()["serving_bytes"] == 100
