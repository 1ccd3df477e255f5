"""ROBE-Z (``robe.v1``): offsets and blocks against an independent hand computation, signs, sparse
gradients, budgets, determinism and raw ids. The registry puts it in every contract test as well
(tests/test_contract.py)."""

import io

import pytest
import torch

from embcompress import BudgetError
from embcompress.hashing import bucket
from embcompress.memory import baseline_bytes
from embcompress.tables.robe import RobeEmbedding

U64 = (1 << 64) - 1


# ----------------------------------------------------------------- an independent splitmix64, in Python ints
def mix64_py(z: int) -> int:
    """splitmix64's output function on unsigned 64-bit Python ints (Vigna's splitmix64.c)."""
    z = (z + 0x9E3779B97F4A7C15) & U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def keyed_seed_py(seed: int, f: int, j: int) -> int:
    return mix64_py(mix64_py(mix64_py(seed) ^ f) ^ j)


def block_py(x: int, seed: int, f: int, j: int, num_offsets: int) -> tuple[int, int]:
    """(offset, sign) of block ``j`` of id ``x`` in field ``f``, as the module docstring defines them."""
    h = mix64_py(x ^ mix64_py(keyed_seed_py(seed, f, j)))
    return (h % 2**63) % num_offsets, (-1 if h >> 63 else 1)


def test_the_python_reference_is_splitmix64():
    assert mix64_py(1234567) == 6457827717110365317  # the published first output of splitmix64(1234567)


def test_seeds_are_the_documented_keyed_seeds():
    t = RobeEmbedding([100, 30, 7], 8, size=50, block_size=3, seed=5)
    assert t.seeds.shape == (3, 3)  # ceil(8 / 3) blocks per field
    expected = [[keyed_seed_py(5, f, j) for j in range(3)] for f in range(3)]
    assert [[v & U64 for v in row] for row in t.seeds.tolist()] == expected


@pytest.mark.parametrize("signed", [True, False])
def test_vector_equals_hand_computed_blocks(signed):
    # D = 5, Z = 2: blocks cover coordinates (0, 1), (2, 3) and (4,) (the last one cut at D); |M| = 20, so the
    # offset modulus is |M| - Z + 1 = 19. The array holds 1..20, so every output coordinate names the element
    # read.
    t = RobeEmbedding([100, 30], 5, size=20, block_size=2, signed=signed, seed=3)
    with torch.no_grad():
        t.weight.copy_(torch.arange(1, 21, dtype=torch.float32))
    ids = torch.tensor([[7, 29], [0, 0], [2**40 + 5, 13], [99, 2**62 + 1]])
    out = t(ids)
    for b, row in enumerate(ids.tolist()):
        for f, x in enumerate(row):
            expected = []
            for c in range(5):
                j, k = divmod(c, 2)
                offset, sign = block_py(x, 3, f, j, 19)
                expected.append((sign if signed else 1) * (offset + k + 1))
            assert out[b, f].tolist() == expected, (b, f, x)


def test_offsets_pinned():
    # robe.v1's checkpoints mean these offsets: changing the hash of a saved name needs a new version.
    t = RobeEmbedding([100, 30], 4, size=1000, block_size=2, seed=0)
    offsets = t.block_offsets(torch.tensor([[7, 29], [0, 0]]), torch.arange(2))
    expected = [[block_py(x, 0, f, j, 999)[0] for j in range(2)] for f, x in enumerate([7, 29])]
    expected_zero = [[block_py(0, 0, f, j, 999)[0] for j in range(2)] for f in range(2)]
    assert offsets.tolist() == [expected, expected_zero]
    assert offsets.tolist() == PINNED_OFFSETS


PINNED_OFFSETS = [[[328, 130], [927, 196]], [[212, 136], [760, 582]]]


def test_offsets_are_the_documented_bucket_and_stay_in_the_array():
    t = RobeEmbedding([2**40, 50], 16, size=40, block_size=4, seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randint(0, 2**40, (5000,), generator=g),
                       torch.randint(0, 50, (5000,), generator=g)], 1)
    offsets = t.block_offsets(ids, torch.arange(2))  # [5000, 2, 4]
    for j in range(4):
        assert torch.equal(offsets[..., j], bucket(ids, t.seeds[:, j], 40 - 4 + 1))
    assert int(offsets.min()) == 0 and int(offsets.max()) == 40 - 4  # every start position, none past the end
    assert len(torch.unique(offsets[:, 0])) == 37


def test_block_size_one_is_element_wise_hashing():
    t = RobeEmbedding([1000, 30], 6, size=97, block_size=1, seed=2)
    ids = torch.tensor([[5, 3], [999, 29], [123, 0]])
    out = t(ids)
    assert t.num_offsets == 97 and t.seeds.shape == (2, 6)
    for c in range(6):
        rows = bucket(ids, t.seeds[:, c], 97)  # one hashed weight per coordinate, as in HashedNets
        signs = t.block_signs(ids, torch.arange(2))[..., c]
        assert torch.equal(out[..., c], signs * t.weight[rows])


def test_one_block_per_vector_reads_a_contiguous_slice():
    t = RobeEmbedding([1000], 8, size=64, signed=False)  # block_size=None: Z = D
    assert t.block_size == 8 and t.num_blocks == 1
    ids = torch.tensor([[3], [500]])
    offsets = t.block_offsets(ids, torch.arange(1))
    for b in range(2):
        o = int(offsets[b, 0, 0])
        assert torch.equal(t(ids)[b, 0], t.weight[o : o + 8])


def test_size_equal_to_block_size_has_one_block_position():
    t = RobeEmbedding([1000, 10], 4, size=4, signed=False)
    out = t(torch.tensor([[0, 1], [999, 9]]))
    assert torch.equal(out, t.weight.expand(2, 2, 4))


def test_signs_are_the_top_bit_and_flip_whole_blocks():
    kwargs = dict(size=200, block_size=4, seed=9)
    signed, plain = RobeEmbedding([10**6], 16, **kwargs), RobeEmbedding([10**6], 16, signed=False, **kwargs)
    plain.weight.data.copy_(signed.weight)  # same seeds (same seed), same array
    ids = torch.arange(4000).unsqueeze(1)
    signs = signed.block_signs(ids, torch.arange(1))  # [4000, 1, 4]
    h_top = [[block_py(x, 9, 0, j, 197)[1] for j in range(4)] for x in range(20)]
    assert signs[:20, 0].tolist() == h_top
    assert torch.equal(signed(ids), plain(ids) * signs.repeat_interleave(4, dim=-1))
    assert 0.45 < float((signs < 0).float().mean()) < 0.55
    assert torch.equal(plain.block_signs(ids, torch.arange(1)), torch.ones(4000, 1, 4))


# --------------------------------------------------------------------------------------------- gradients
def test_dense_gradient_is_the_signed_scatter_of_the_output_gradient():
    t = RobeEmbedding([500, 40], 6, size=30, block_size=4, seed=4)  # blocks (0..3) and (4, 5)
    ids = torch.tensor([[1, 2], [3, 39], [499, 0]])
    out = t(ids)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    offsets = t.block_offsets(ids, torch.arange(2))
    signs = t.block_signs(ids, torch.arange(2))
    expected = torch.zeros(30)
    for b in range(3):
        for f in range(2):
            for c in range(6):
                j, k = divmod(c, 4)
                expected[offsets[b, f, j] + k] += signs[b, f, j] * upstream[b, f, c]
    torch.testing.assert_close(t.weight.grad, expected)


# size 300 <= 16 x 72 reads: the gradient is summed by a dense scatter; 5000: by torch.unique
@pytest.mark.parametrize("size", [300, 5000])
@pytest.mark.parametrize("optimizer", [torch.optim.SparseAdam, torch.optim.Adagrad])
def test_sparse_gradients_on_the_1d_array_train(optimizer, size):
    dense = RobeEmbedding([1000, 50, 7], 8, size=size, block_size=3, seed=1)
    sparse = RobeEmbedding([1000, 50, 7], 8, size=size, block_size=3, seed=1, sparse=True)
    sparse.weight.data.copy_(dense.weight)
    assert sparse.sparse_parameters() == [sparse.weight] and dense.sparse_parameters() == []
    ids = torch.tensor([[5, 3, 1], [999, 49, 6], [5, 0, 0]])
    upstream = torch.randn(3, 3, 8)
    (dense(ids) * upstream).sum().backward()
    (sparse(ids) * upstream).sum().backward()
    grad = sparse.weight.grad
    assert grad.is_sparse and grad.shape == (size,) and grad.sparse_dim() == 1
    # summed per element in backward: one entry per touched float, sorted (autograd drops the coalesced flag)
    assert torch.equal(grad._indices()[0], torch.unique(sparse.block_offsets(ids, torch.arange(3)).unsqueeze(-1)
                                                       .add(torch.arange(3)).flatten(-2)[..., :8]))
    torch.testing.assert_close(grad.to_dense(), dense.weight.grad)
    before = sparse.weight.detach().clone()
    optimizer([sparse.weight], lr=0.1).step()
    changed = sparse.weight.detach() != before
    touched = grad._indices()[0]
    assert changed.any() and set(changed.nonzero()[:, 0].tolist()) <= set(touched.tolist())


# ---------------------------------------------------------------------------------------------- budgets
CARDS = [100_000, 20_000, 3_000, 500, 40, 3]


@pytest.mark.parametrize("block_size", [1, 4, None])
@pytest.mark.parametrize("ratio", [2, 16, 64, 256, 1000])
def test_budget_sets_the_array_length(ratio, block_size):
    budget = baseline_bytes(CARDS, 16) / ratio
    t = RobeEmbedding.from_budget(CARDS, 16, budget_bytes=budget, block_size=block_size)
    blocks = 16 // (block_size or 16)
    seed_bytes = len(CARDS) * blocks * 8
    assert t.size == (int(budget) - seed_bytes) // 4  # every byte left after the seeds goes to the array
    total = t.memory_report().total_bytes
    assert total == t.size * 4 + seed_bytes and 0.95 * budget <= total <= budget


# the smallest table: one block of Z floats, and one int64 seed per field and block (6 fields, 16 / Z blocks)
@pytest.mark.parametrize("block_size, minimum", [
    (1, 1 * 4 + 6 * 16 * 8), (4, 4 * 4 + 6 * 4 * 8), (None, 16 * 4 + 6 * 8),
])
def test_budget_below_one_block_names_the_minimum(block_size, minimum):
    with pytest.raises(BudgetError, match=rf"robe.v1: .*minimum budget {minimum:,} bytes"):
        RobeEmbedding.from_budget(CARDS, 16, budget_bytes=minimum - 1, block_size=block_size)
    smallest = RobeEmbedding.from_budget(CARDS, 16, budget_bytes=minimum, block_size=block_size)
    assert smallest.size == (block_size or 16)


# -------------------------------------------------------------------------------------- init and options
@pytest.mark.parametrize("options", [{"block_size": 1}, {"block_size": 3}, {"signed": False}, {}])
def test_init_std_is_the_std_of_the_returned_vectors(options):
    t = RobeEmbedding([20_000, 3, 570], 16, size=40_000, init_std=0.05, **options)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randint(0, n, (10_000,), generator=g) for n in (20_000, 3, 570)], dim=1)
    out = t(ids)
    assert abs(out.std().item() / 0.05 - 1) < 0.10
    assert abs(out.mean().item()) < 0.01


@pytest.mark.parametrize("options, match", [
    ({"size": 3, "block_size": 4}, r"robe.v1: size must be at least block_size = 4.*got 3"),
    ({"size": 100, "block_size": 9}, r"robe.v1: block_size must be an int in \[1, 8\].*got 9"),
    ({"size": 100, "block_size": 0}, r"robe.v1: block_size must be an int in \[1, 8\].*got 0"),
    ({"size": 7}, r"robe.v1: size must be at least block_size = 8.*got 7"),  # default Z = D = 8
    ({"size": 0}, r"robe.v1: size must be a positive int, got 0"),
    ({"size": 100, "signed": 1}, r"robe.v1: signed must be a bool.*got 1"),
])
def test_bad_options_name_option_and_value(options, match):
    with pytest.raises(ValueError, match=match):
        RobeEmbedding([100, 10], 8, **options)


def test_checkpoint_refuses_another_layout():
    t = RobeEmbedding([100, 10], 8, size=64, block_size=4)
    for other in (RobeEmbedding([100, 10], 8, size=64, block_size=2),
                  RobeEmbedding([100, 10], 8, size=64, block_size=4, signed=False)):
        with pytest.raises(ValueError):
            other.load_state_dict(t.state_dict())


# -------------------------------------------------------------------------------- determinism and raw ids
def test_same_seed_same_outputs_and_hashes_depend_on_id_and_seed_only():
    torch.manual_seed(1)
    a = RobeEmbedding([10**6, 50], 8, size=500, block_size=2, seed=7)
    torch.manual_seed(2)  # another initialisation: the hashes must not follow the torch RNG
    b = RobeEmbedding([10**6, 50], 8, size=500, block_size=2, seed=7)
    ids = torch.tensor([[12345, 3], [2**40, 49]])
    fields = torch.arange(2)
    assert torch.equal(a.block_offsets(ids, fields), b.block_offsets(ids, fields))
    b.weight.data.copy_(a.weight)
    assert torch.equal(a(ids), b(ids))
    c = RobeEmbedding([10**6, 50], 8, size=500, block_size=2, seed=8)
    assert not torch.equal(a.block_offsets(ids, fields), c.block_offsets(ids, fields))
    # A field's offsets depend on (seed, field, block, id) only: not on the other fields or on D.
    more = RobeEmbedding([10**6, 50, 7], 16, size=500, block_size=2, seed=7)
    wide = more.block_offsets(torch.cat([ids, torch.zeros(2, 1, dtype=torch.long)], 1), torch.arange(3))
    assert torch.equal(wide[:, :2, :4], a.block_offsets(ids, fields))


def test_reload_gives_the_same_outputs():
    a = RobeEmbedding([1000, 50], 8, size=300, block_size=4, seed=3)
    b = RobeEmbedding([1000, 50], 8, size=300, block_size=4, seed=4)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    ids = torch.tensor([[999, 49], [0, 0]])
    assert torch.equal(a(ids), b(ids))


def test_raw_unbounded_ids_in_every_field():
    t = RobeEmbedding([10, 3], 8, size=5000, block_size=2)
    assert t.accepts_raw_ids and list(t.id_limits()) == [-1, -1]
    ids = torch.tensor([[2**24 + 1, 2**62], [2**24 + 2, 2**63 - 1], [2**31 - 1, 2**53 + 1]])
    out = t(ids)
    assert torch.equal(out, t(ids.flip(0)).flip(0))
    assert len({tuple(v) for v in out.reshape(-1, 8).tolist()}) == 6
    with pytest.raises(ValueError, match="-3"):
        t(torch.tensor([[1, -3]]))


def test_forward_is_one_vectorised_call_over_fields_and_bags():
    t = RobeEmbedding([1000, 50, 7], 8, size=300, block_size=3)
    ids = torch.tensor([[5, 3, 1], [999, 49, 6]])
    per_field = torch.stack([t(torch.stack([ids[:, f] if g == f else torch.zeros(2, dtype=torch.long)
                                            for g in range(3)], 1))[:, f] for f in range(3)], 1)
    assert torch.equal(t(ids), per_field)
    lengths = torch.tensor([[1, 1], [1, 1], [1, 1]])
    torch.testing.assert_close(t.forward_bags(ids.t().reshape(-1), lengths), t(ids))
