"""The compressed tables inside torchrec: its DLRM and DLRM_DCN run on a CompressedEmbeddingBagCollection of
every registered method, with multi-hot, weighted KeyedJaggedTensors, and equal the tables' own pooling."""

import math

import pytest
import torch

torchrec = pytest.importorskip("torchrec", reason="torchrec is not installed")

from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

from embcompress.contract import BudgetError
from embcompress.data import Batch, iterate_batches
from embcompress.memory import baseline_bytes
from embcompress.synthetic import SyntheticConfig, make_synthetic
from embcompress.torchrec import (
    CompressedEmbeddingBagCollection,
    configs_for,
    ids_to_kjt,
    to_torchrec_batch,
)

CARDS = [1000, 3, 57, 400]
NAMES = ["f0", "f1", "f2", "f3"]
DIM = 8
BATCH = 6


def make_ebc(method: str, *, pooling=PoolingType.SUM, is_weighted=False, **options):
    """The collection at a quarter of the baseline bytes where the method takes a budget, else as constructed."""
    configs = configs_for(CARDS, DIM, NAMES, pooling=pooling)
    try:
        return CompressedEmbeddingBagCollection(configs, {"type": method, **options}, is_weighted=is_weighted,
                                                budget_bytes=baseline_bytes(CARDS, DIM) / 4)
    except BudgetError:
        return CompressedEmbeddingBagCollection(configs, {"type": method, **options}, is_weighted=is_weighted)


def multi_hot(seed: int = 0, *, keys=NAMES, cards=CARDS, batch=BATCH, weighted=True) -> KeyedJaggedTensor:
    """Bags of 0..4 ids per (feature, sample), empty bags included, with positive per-id weights."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (len(keys), batch), generator=g)
    lengths[0, 0] = 0  # at least one empty bag
    lengths[1, 1] = 4
    values = torch.cat([torch.randint(0, n, (int(lengths[f].sum()),), generator=g) for f, n in enumerate(cards)])
    weights = torch.rand(values.shape, generator=g) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=values, lengths=lengths.reshape(-1),
                                               weights=weights)


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_dlrm_and_dcn_run_on_every_method_and_equal_the_tables_own_pooling(table_name, pooling):
    mode = "sum" if pooling == PoolingType.SUM else "mean"
    kjt = multi_hot(1)
    lengths = kjt.lengths().view(len(NAMES), -1)
    dense = torch.rand(BATCH, 5)
    for arch in ("dlrm", "dcn"):
        torch.manual_seed(0)
        ebc = make_ebc(table_name, pooling=pooling, is_weighted=True)
        if arch == "dlrm":
            model = DLRM(embedding_bag_collection=ebc, dense_in_features=5, dense_arch_layer_sizes=[16, DIM],
                         over_arch_layer_sizes=[16, 1])
        else:
            model = DLRM_DCN(embedding_bag_collection=ebc, dense_in_features=5, dense_arch_layer_sizes=[16, DIM],
                             over_arch_layer_sizes=[16, 1], dcn_num_layers=2, dcn_low_rank_dim=4)
        # Same random state before each call: some methods draw at random in training (OptEmbed's widths).
        torch.manual_seed(7)
        own = ebc.embeddings.forward_bags(kjt.values(), lengths, mode=mode, weights=kjt.weights())
        torch.manual_seed(7)
        out = ebc(kjt)
        assert out.keys() == NAMES and out.length_per_key() == [DIM] * len(NAMES)
        torch.testing.assert_close(out.values(), own.reshape(BATCH, -1), rtol=0, atol=0)
        torch.manual_seed(7)  # torchrec's own sparse arch sees exactly those vectors
        torch.testing.assert_close(model.sparse_arch(kjt), own, rtol=0, atol=0)
        logits = model(dense, kjt)
        assert logits.shape == (BATCH, 1) and torch.isfinite(logits).all()
        logits.sum().backward()
        if ebc.embeddings.trains_rows_itself():  # rows trained at low precision: their gradient is captured
            assert any(getattr(m, "_captured", None) for m in ebc.embeddings.modules()), f"{table_name}: no gradient"
            continue
        grads = [p.grad for p in ebc.embeddings.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.coalesce().values().abs().sum() > 0 if g.is_sparse
                             else g is not None and g.abs().sum() > 0 for g in grads), f"{table_name}: no gradient"


def test_unweighted_collection_ignores_weights_like_torchrec(table_name):
    ebc = make_ebc(table_name).eval()
    kjt = multi_hot(2)
    own = ebc.embeddings.forward_bags(kjt.values(), kjt.lengths().view(len(NAMES), -1), mode="sum")
    torch.testing.assert_close(ebc(kjt).values(), own.reshape(BATCH, -1), rtol=0, atol=0)


def test_matches_torchrec_embedding_bag_collection_with_copied_weights():
    """full.v1 holds one row per id, so with torchrec's weights copied in both give the same pooled vectors."""
    from torchrec import EmbeddingBagCollection

    kjt = multi_hot(3)
    for weighted in (True, False):
        configs = configs_for(CARDS, DIM, NAMES)
        if not weighted:  # torch's embedding_bag takes per-id weights with sum pooling only
            configs[2].pooling = PoolingType.MEAN
        ref = EmbeddingBagCollection(tables=configs, is_weighted=weighted)
        ebc = CompressedEmbeddingBagCollection(configs, "full.v1", is_weighted=weighted)
        with torch.no_grad():
            ebc.embeddings.weight.copy_(torch.cat([ref.embedding_bags[c.name].weight for c in configs]))
        torch.testing.assert_close(ebc(kjt).values(), ref(kjt).values())


def test_key_order_extra_keys_and_int32_values():
    ebc = make_ebc("hashing.v1")
    kjt = multi_hot(4)
    expect = ebc(kjt).values()
    shuffled = kjt.permute([3, 1, 0, 2])
    torch.testing.assert_close(ebc(shuffled).values(), expect, rtol=0, atol=0)
    unused = KeyedJaggedTensor.from_lengths_sync(keys=["unused"], values=torch.arange(BATCH),
                                                 lengths=torch.ones(BATCH, dtype=torch.int64),
                                                 weights=torch.ones(BATCH))
    extra = KeyedJaggedTensor.concat([unused, kjt])
    assert extra.keys() == ["unused", *NAMES]
    torch.testing.assert_close(ebc(extra).values(), expect, rtol=0, atol=0)
    int32 = KeyedJaggedTensor.from_lengths_sync(keys=NAMES, values=kjt.values().int(), lengths=kjt.lengths())
    torch.testing.assert_close(ebc(int32).values(), expect, rtol=0, atol=0)


def test_shared_table_and_mixed_pooling():
    configs = [
        EmbeddingBagConfig(name="t", num_embeddings=20, embedding_dim=4, feature_names=["a", "b"],
                           pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="u", num_embeddings=5, embedding_dim=4, feature_names=["c"]),
    ]
    ebc = CompressedEmbeddingBagCollection(configs, "full.v1", is_weighted=True)
    assert ebc.embeddings.num_fields == 2 and ebc.feature_names == ["a", "b", "c"]
    kjt = multi_hot(5, keys=["a", "b", "c"], cards=[20, 20, 5], batch=3)
    out = ebc(kjt).to_dict()
    w, offsets = ebc.embeddings.weight, [0, 0, 20]
    per_key = kjt.to_dict()
    for f, key in enumerate(["a", "b", "c"]):
        jt = per_key[key]
        for b, (ids, wts) in enumerate(zip(jt.to_dense(), jt.to_dense_weights())):
            pooled = (w[ids + offsets[f]] * wts.unsqueeze(-1)).sum(0)
            if key != "c" and len(ids):
                pooled = pooled / len(ids)
            torch.testing.assert_close(out[key][b], pooled)


def test_bad_configs_and_inputs_raise_with_the_value():
    good = configs_for(CARDS, DIM, NAMES)
    with pytest.raises(ValueError, match="embedding_dim 4"):
        CompressedEmbeddingBagCollection([*good, EmbeddingBagConfig(name="x", num_embeddings=3, embedding_dim=4,
                                                                    feature_names=["x"])], "full.v1")
    with pytest.raises(ValueError, match=r"\['f0'\] appear more than once"):
        CompressedEmbeddingBagCollection([*good, EmbeddingBagConfig(name="x", num_embeddings=3, embedding_dim=DIM,
                                                                    feature_names=["f0"])], "full.v1")
    with pytest.raises(ValueError, match="pooling"):
        CompressedEmbeddingBagCollection(configs_for(CARDS, DIM, NAMES, pooling=PoolingType.NONE), "full.v1")
    with pytest.raises(ValueError, match="budget_bytes must be a positive number, got -3"):
        CompressedEmbeddingBagCollection(good, "qr.v1", budget_bytes=-3)
    with pytest.raises(LookupError, match="qr_v1"):
        CompressedEmbeddingBagCollection(good, "qr_v1.v1")
    ebc = CompressedEmbeddingBagCollection(good, "full.v1", is_weighted=True)
    with pytest.raises(ValueError, match="no weights"):
        ebc(multi_hot(0, weighted=False))
    with pytest.raises(ValueError, match=r"no feature\(s\) \['f3'\]"):
        ebc(multi_hot(0, keys=NAMES[:3], cards=CARDS[:3]))
    bad = multi_hot(0)
    bad = KeyedJaggedTensor.from_lengths_sync(keys=NAMES, values=bad.values() + 1000, lengths=bad.lengths(),
                                              weights=bad.weights())
    with pytest.raises(ValueError, match="t_f0.*outside its domain"):
        ebc(bad)


def test_torchrec_training_step_on_project_data():
    data = make_synthetic(SyntheticConfig(rows=2_000, cardinality_exponent=0.2, seed=1))
    configs = configs_for(data.cardinalities, DIM, data.field_names)
    torch.manual_seed(0)
    ebc = CompressedEmbeddingBagCollection(configs, {"type": "qr.v1"},
                                           budget_bytes=baseline_bytes(data.cardinalities, DIM) / 2)
    model = DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=data.num_dense,
                           dense_arch_layer_sizes=[16, DIM], over_arch_layer_sizes=[16, 1]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = iterate_batches(data.split("train"), 256, shuffle=True, generator=torch.Generator().manual_seed(0))
    losses = []
    for _, batch in zip(range(12), batches):
        tb = to_torchrec_batch(batch, data.field_names)
        assert tb.sparse_features.keys() == list(data.field_names)
        loss, (_, logits, labels) = model(tb)
        assert logits.shape == labels.shape == (len(batch),)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    # the KJT of one id per field pools to exactly the project's [B, F, D] lookup
    batch = next(iterate_batches(data.split("val"), 64))
    pooled = ebc(ids_to_kjt(batch.sparse, data.field_names)).values().view(64, -1, DIM)
    torch.testing.assert_close(pooled, ebc.embeddings(batch.sparse), rtol=0, atol=0)
    with pytest.raises(TypeError, match="embcompress.data.Batch"):
        to_torchrec_batch((batch.dense, batch.sparse, batch.labels), data.field_names)
    with pytest.raises(ValueError, match="3 keys"):
        ids_to_kjt(batch.sparse, ["a", "b", "c"])
    assert isinstance(batch, Batch)


# ------------------------------------------------------------------------------ torchrec's quantized collections
def test_quantized_collection_serves_our_rows_and_counts_the_kernels_storage():
    from embcompress.quantize import row_bytes
    from embcompress.tables.full import FullEmbedding
    from embcompress.torchrec import ids_to_kjt, quantized_collection

    torch.manual_seed(0)
    table = FullEmbedding([100, 30, 7], 16).set_field_names(["a", "b", "c"])
    ids = torch.tensor([[1, 2, 3], [99, 29, 6], [0, 0, 0]])
    rows = 137
    for precision in ("fp16", "int8", "int4"):
        ours = table.export(precision)(ids)
        served = {}
        for alignment in (16, 1):
            q = quantized_collection(table, precision, row_alignment=alignment)
            served[alignment] = q.stored_bytes()
            out = q(ids_to_kjt(ids, ["a", "b", "c"])).values().view(3, 3, 16)
            if precision == "fp16":
                assert torch.equal(out, ours)
            else:  # fbgemm rounds its scale to nearest, ours outwards: within one step of the row's codes
                step = (table.weight.max() - table.weight.min()) / (255 if precision == "int8" else 15)
                assert (out - ours).abs().max() <= step
        assert served[1] >= rows * row_bytes(16, precision)
        assert served[16] >= rows * -(-row_bytes(16, precision) // 16) * 16  # rows padded to 16 bytes
    assert quantized_collection(table, "int8", row_alignment=16).stored_bytes() > \
        quantized_collection(table, "int8", row_alignment=4).stored_bytes()  # 32 against 20 bytes a row


def test_quantized_collection_refuses_what_it_cannot_serve():
    from embcompress.tables.full import FullEmbedding
    from embcompress.tables.hashing import HashingEmbedding
    from embcompress.torchrec import quantized_collection

    with pytest.raises(ValueError, match="full.v1"):
        quantized_collection(HashingEmbedding([100], 4, num_buckets=10), "int8")
    with pytest.raises(ValueError, match="'int3'"):
        quantized_collection(FullEmbedding([100], 4), "int3")
