"""Full tables too large for one machine: torchrec's DistributedModelParallel, table-wise sharding, 2 CPU processes.

Builds torchrec's ``DLRM`` over a plain torchrec ``EmbeddingBagCollection`` (full tables, the uncompressed
baseline) on the ``meta`` device, plans table-wise sharding over 2 gloo processes on this machine, wraps it in
``DistributedModelParallel`` and runs a few training steps on the synthetic data (converted with
:func:`embcompress.torchrec.to_torchrec_batch`). Prints the plan (which rank holds which table) and the losses,
or the exact error where torchrec does not support a step here.

    nice .venv/bin/python benchmarks/dmp_cpu.py
"""

from __future__ import annotations

import traceback

import torch

from embcompress.distributed import launch


def worker(steps: int = 5) -> dict:
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingType
    from torchrec.models.dlrm import DLRM, DLRMTrain

    from embcompress.data import iterate_batches
    from embcompress.synthetic import SyntheticConfig, make_synthetic
    from embcompress.torchrec import configs_for, to_torchrec_batch

    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict = {"rank": rank, "stage": "data"}
    try:
        data = make_synthetic(SyntheticConfig(rows=20_000, cardinality_exponent=0.25, seed=0))
        configs = configs_for(data.cardinalities, 16, data.field_names)
        out["stage"] = "model on meta"
        torch.manual_seed(0)
        ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
        model = DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=data.num_dense,
                               dense_arch_layer_sizes=[32, 16], over_arch_layer_sizes=[32, 1]))
        out["stage"] = "plan"
        sharder = EmbeddingBagCollectionSharder()
        constraints = {c.name: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]) for c in configs}
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"),
                                           constraints=constraints)
        plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
        shard_plan = plan.plan["model.sparse_arch.embedding_bag_collection"]
        out["plan"] = {name: (p.sharding_type, [s.placement.rank() for s in p.sharding_spec.shards])
                       for name, p in shard_plan.items()}
        out["stage"] = "DistributedModelParallel"
        dmp = DistributedModelParallel(module=model, device=torch.device("cpu"), plan=plan, sharders=[sharder])
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        held = {}  # the rows of each table this rank stores
        for name, value in dmp.state_dict().items():
            if isinstance(value, ShardedTensor):
                rows = sum(shard.tensor.shape[0] for shard in value.local_shards())
                if rows:
                    held[name.split(".")[-2]] = rows
        out["local_tables"] = f"{len(held)} tables, {sum(held.values()):,} of {sum(data.cardinalities):,} rows"
        out["stage"] = "training steps"
        opt = torch.optim.Adagrad(dmp.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _, batch in zip(range(steps), iterate_batches(data.split("train"), 1024, shuffle=True, generator=gen)):
            lo, hi = rank * len(batch) // world, (rank + 1) * len(batch) // world
            part = type(batch)(batch.dense[lo:hi], batch.sparse[lo:hi], batch.labels[lo:hi])
            loss, _ = dmp(to_torchrec_batch(part, data.field_names))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        out["losses"] = losses
        out["stage"] = "done"
    except Exception as err:  # noqa: BLE001 -- the report says exactly what fails
        out["error"] = f"{type(err).__name__}: {err}"
        out["traceback"] = traceback.format_exc(limit=6)
    return out


def main() -> None:
    import torchrec

    print(f"torch {torch.__version__}, torchrec {getattr(torchrec, '__version__', '?')}")
    for r in launch(worker, 2, threads=1):
        print(f"rank {r['rank']}: reached stage {r['stage']!r}")
        for key in ("plan", "local_tables", "losses", "error"):
            if key in r:
                print(f"  {key}: {r[key]}")
        if "traceback" in r:
            print(r["traceback"])


if __name__ == "__main__":
    main()
