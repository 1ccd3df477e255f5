"""How much of the gap to the Bayes AUC is the data's? The well-specified model, more rows, and the values it saw.

The default synthetic labels come from a factorisation-machine click model, so ``fm.v1`` with the full table is the
well-specified learner. This script trains it (the tuned setting of ``methods.yaml``'s full table: Adam lr 0.01,
embedding L2 1e-5, early stop) on the default generator at several row counts, and prints per row count the test
AUC, the Bayes AUC of that test split, and :func:`embcompress.synthetic.seen_values_auc`: the true model's AUC when
values rarer than k in training count as unknown (the most any learner can know of them). If the learner's gap to
Bayes shrinks as rows grow while the seen-values AUC stays near Bayes, the gap is estimation noise on values that
were seen, which more rows remove: the ceiling no learner reaches at 1.2M rows is a property of the data size.

    OMP_NUM_THREADS=1 python benchmarks/ceiling.py 600000 1200000 2400000 4800000
"""

from __future__ import annotations

import sys
import time

import torch

from embcompress import build_model, build_table
from embcompress.synthetic import SyntheticConfig, make_synthetic, seen_values_auc
from embcompress.training import TrainConfig, train


def main(row_counts: list[int]) -> None:
    print("| rows | FM test AUC | Bayes AUC | gap | seen >= 1 | seen >= 10 | best epoch | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in row_counts:
        start = time.perf_counter()
        data = make_synthetic(SyntheticConfig(rows=rows))
        torch.manual_seed(0)
        table = build_table({"type": "full.v1", "sparse": True}, data.cardinalities, 16)
        model = build_model({"type": "fm.v1"}, table, data.num_dense)
        cfg = TrainConfig(epochs=10, batch_size=4096, lr=0.01, patience=1, embedding_l2=1e-5, progress=False)
        result = train(model, data, cfg)
        print(f"| {rows:,} | {result.test_auc:.4f} | {data.bayes_auc:.4f} | {data.bayes_auc - result.test_auc:.4f} "
              f"| {seen_values_auc(data, 1):.4f} | {seen_values_auc(data, 10):.4f} | {result.best_epoch} "
              f"| {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [600_000, 1_200_000, 2_400_000, 4_800_000])
