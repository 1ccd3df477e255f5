"""The CTR model zoo, driven by the registry: every model x every table builds, runs forward and backward,
learns, takes ``num_dense=0``, rejects bad options, and has its size options overridable from a spec.

Everything runs on one CPU thread (restored afterwards): on a shared machine, tiny models train many times
faster without thread contention.
"""

import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embcompress import MODELS, build_model, build_table, list_models, list_tables
from embcompress.ctr_models.layers import (
    MLP,
    BilinearFusion,
    CrossNet,
    CrossNetV2,
    FMInteraction,
    flat_input,
)
from embcompress.registry import SpecError

from .conftest import make_table

CARDS = [50, 7, 300, 20]
DIM = 8
NUM_DENSE = 3
BATCH = 16

# Small sizes for every size option (those with a tuple default), so the matrix runs in seconds. A new model
# with size options adds its entry here; test_size_options_override_from_spec insists on it.
SMALL = {
    "dcn.v1": {"cross_layers": 2, "deep_mlp": [32]},
    "dcn_v2.v1": {"cross_layers": 2, "deep_mlp": [32]},
    "deepfm.v1": {"deep_mlp": [32, 32]},
    "dlrm.v1": {"bottom_mlp": [16], "top_mlp": [32]},
    "finalmlp.v1": {"mlp1": [32, 32], "mlp2": [16], "gate_mlp": [16], "num_heads": 2},
    "wide_deep.v1": {"deep_mlp": [32, 16]},
}

# Bad options per model, with a fragment the error message must contain (the option or its bad value).
BAD = {
    "dcn.v1": [({"cross_layers": 0}, "cross_layers"), ({"deep_mlp": [16, -1]}, "deep_mlp"),
               ({"batch_norm": "no"}, "batch_norm")],
    "dcn_v2.v1": [({"structure": "serial"}, "serial"), ({"low_rank": 0}, "low_rank"),
                  ({"num_experts": 0}, "num_experts"), ({"cross_layers": 2.5}, "cross_layers"),
                  ({"dropout": -0.1}, "dropout")],
    "deepfm.v1": [({"deep_mlp": []}, "deep_mlp"), ({"dropout": 1.0}, "dropout"),
                  ({"batch_norm": 1}, "batch_norm")],
    "dlrm.v1": [({"bottom_mlp": [0]}, "bottom_mlp"), ({"top_mlp": "big"}, "top_mlp")],
    "finalmlp.v1": [({"mlp1": [16], "mlp2": [8], "num_heads": 3}, "num_heads=3"), ({"mlp2": []}, "mlp2"),
                    ({"gate_mlp": [0]}, "gate_mlp"), ({"dropout": "0.1"}, "dropout")],
    "wide_deep.v1": [({"deep_mlp": "1024"}, "deep_mlp"), ({"dropout": 2}, "dropout")],
}

# Variants beyond the defaults that the learning test also covers.
VARIANTS = [
    ("dcn_v2.v1", {"structure": "stacked"}),
    ("dcn_v2.v1", {"low_rank": 4, "num_experts": 3}),
    ("dcn_v2.v1", {"deep_mlp": []}),
    ("dcn.v1", {"deep_mlp": []}),
    ("finalmlp.v1", {"gate_mlp": None}),
    ("finalmlp.v1", {"gate_mlp": []}),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_spec(name: str, **extra) -> dict:
    return {"type": name, **SMALL.get(name, {}), **extra}


def batch(n: int = BATCH, num_dense: int = NUM_DENSE, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, c, (n,), generator=g) for c in CARDS], dim=1)
    dense = torch.rand(n, num_dense, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g).float()
    return dense, sparse, labels


def accepts(name: str, option: str) -> bool:
    return option in inspect.signature(MODELS.get(name)).parameters


@pytest.fixture(params=list_models())
def model_name(request) -> str:
    return request.param


# ------------------------------------------------------------------------------------ every model x table
@pytest.mark.parametrize("table_name", list_tables())
def test_forward_backward_with_every_table(model_name, table_name):
    table = make_table(table_name, CARDS, DIM)
    model = build_model(small_spec(model_name), table, NUM_DENSE)
    dense, sparse, _ = batch()
    logits = model(dense, sparse)
    assert logits.shape == (BATCH,) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{model_name} on {table_name}: no gradient reached {missing}"


# -------------------------------------------------------------------------------------------- it learns
# 64 rows of random ids with random labels, memorised by full-batch Adam. Every model, LR included, must
# bring the training BCE from about ln 2 = 0.69 to under 0.1: the 300-id field gives nearly every row its own
# id, so even LR's additive per-id weights (w_f . e_v) can fit the labels; no looser bound is needed for it.
LEARN_BOUND = 0.1


def _case_id(value) -> str:
    return value if isinstance(value, str) else ",".join(f"{k}={v}" for k, v in value.items())


@pytest.mark.parametrize("name, extra", [(n, {}) for n in list_models()] + VARIANTS, ids=_case_id)
def test_overfits_a_tiny_batch(name, extra):
    torch.manual_seed(0)
    options = {**extra, **({"dropout": 0.0} if accepts(name, "dropout") else {})}
    model = build_model(small_spec(name, **options), build_table({"type": "full.v1"}, CARDS, DIM), NUM_DENSE)
    dense, sparse, labels = batch(64)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with torch.no_grad():
        first = F.binary_cross_entropy_with_logits(model(dense, sparse), labels).item()
    for _ in range(150):
        loss = F.binary_cross_entropy_with_logits(model(dense, sparse), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()  # the fitted function itself: batch norm on running statistics, no dropout
    with torch.no_grad():
        final = F.binary_cross_entropy_with_logits(model(dense, sparse), labels).item()
    assert first > LEARN_BOUND and final < LEARN_BOUND, (name, extra, first, final)


# --------------------------------------------------------------------------------------- options, inputs
def test_no_dense_features(model_name):
    model = build_model(small_spec(model_name), make_table("full.v1", CARDS, DIM), 0)
    dense, sparse, _ = batch(num_dense=0)
    assert dense.shape == (BATCH, 0)
    logits = model(dense, sparse)
    assert logits.shape == (BATCH,)
    logits.sum().backward()


def test_defaults_build_and_run(model_name):
    # The published default sizes are consistent (e.g. FinalMLP's 200 heads divide both stream widths).
    model = build_model({"type": model_name}, make_table("full.v1", CARDS, DIM), NUM_DENSE).eval()
    dense, sparse, _ = batch(4)
    assert model(dense, sparse).shape == (4,)


def test_size_options_override_from_spec(model_name):
    cls = MODELS.get(model_name)
    params = inspect.signature(cls).parameters
    size_options = {k: p.default for k, p in params.items() if isinstance(p.default, tuple)}
    spec = small_spec(model_name)
    assert set(size_options) <= set(spec), f"add small sizes for {model_name} to SMALL"
    table = make_table("full.v1", CARDS, DIM)
    small = build_model(spec, table, NUM_DENSE)
    default = build_model({"type": model_name}, table, NUM_DENSE)
    widths = {m.out_features for m in small.modules() if isinstance(m, nn.Linear)}
    for key, value in size_options.items():
        assert set(spec[key]) <= widths, (key, spec[key], widths)
        assert not set(value) & widths, (key, value, widths)
    if size_options:
        assert dense_params(small) < dense_params(default)


def dense_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embeddings."))


def test_bad_options_raise(model_name):
    table = make_table("full.v1", CARDS, DIM)
    for options, fragment in BAD.get(model_name, []):
        with pytest.raises(ValueError, match=re.escape(fragment)):
            build_model(small_spec(model_name, **options), table, NUM_DENSE)
    with pytest.raises(ValueError, match="num_dense"):
        build_model(small_spec(model_name), table, -1)
    with pytest.raises(SpecError, match="unknown key 'hiden'"):
        build_model(small_spec(model_name, hiden=[8]), table, NUM_DENSE)
    with pytest.raises(ValueError, match="feature collection"):
        build_model(small_spec(model_name), build_table({"type": "full.v1"}, 10, DIM), NUM_DENSE)


def test_every_model_with_options_has_bad_cases(model_name):
    params = inspect.signature(MODELS.get(model_name)).parameters
    options = [k for k in params if k not in ("embeddings", "num_dense")]
    assert not options or model_name in BAD, f"add bad-option cases for {model_name} to BAD"


# ------------------------------------------------------------------------------------------ shared layers
def test_fm_interaction_is_the_sum_of_pairwise_dots():
    v = torch.randn(5, 4, 3)
    pairs = sum((v[:, i] * v[:, j]).sum(-1) for i in range(4) for j in range(i + 1, 4))
    torch.testing.assert_close(FMInteraction()(v), pairs)


def test_cross_layers_follow_their_formulas():
    x0 = torch.randn(6, 5)
    cross = CrossNet(5, 1)
    with torch.no_grad():
        cross.bias.normal_()
    w, b = cross.weight[0], cross.bias[0]
    torch.testing.assert_close(cross(x0), x0 * (x0 @ w).unsqueeze(1) + b + x0)
    full = CrossNetV2(5, 1)
    layer = full.layers[0]
    torch.testing.assert_close(full(x0), x0 * (x0 @ layer.weight.T + layer.bias) + x0)
    mix = CrossNetV2(5, 2, low_rank=2, num_experts=3)
    assert mix(x0).shape == (6, 5)
    assert {n for n, _ in mix.named_parameters()} == {"V", "C", "U", "bias", "gate.weight"}


def test_bilinear_fusion_one_head_is_a_bilinear_form():
    fusion = BilinearFusion(4, 6, num_heads=1)
    y1, y2 = torch.randn(3, 4), torch.randn(3, 6)
    bilinear = ((y1 @ fusion.weight[0]) * y2).sum(-1)
    expected = fusion.linear1(y1).squeeze(-1) + fusion.linear2(y2).squeeze(-1) + bilinear
    torch.testing.assert_close(fusion(y1, y2), expected)
    assert BilinearFusion(4, 6, num_heads=2)(y1, y2).shape == (3,)
    with pytest.raises(ValueError, match="num_heads=4"):
        BilinearFusion(4, 6, num_heads=4)


def test_mlp_options_stay_compatible():
    plain = MLP(4, [8, 2], final_relu=False)
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear]
    full = MLP(4, [8, 2], dropout=0.5, batch_norm=True)
    assert [type(m) for m in full] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout] * 2
    with pytest.raises(ValueError, match="dropout"):
        MLP(4, [8], dropout=1.0)


def test_dense_shape_is_checked():
    vectors = torch.randn(2, 3, 4)
    assert flat_input(vectors, torch.randn(2, 5), 5).shape == (2, 17)
    with pytest.raises(ValueError, match=r"dense must have shape \[2, 5\]"):
        flat_input(vectors, torch.randn(2, 4), 5)


def test_fm_pairwise_scale():
    from embcompress.ctr_models.layers import FMInteraction, fm_pair_scale

    assert fm_pair_scale(26) == pytest.approx(325**-0.5)
    v = torch.randn(3, 4, 5)
    by_hand = sum((v[:, i] * v[:, j]).sum(-1) for i in range(4) for j in range(i + 1, 4))
    torch.testing.assert_close(FMInteraction(0.5)(v), 0.5 * by_hand)
