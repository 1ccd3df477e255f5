"""Registries of versioned names and spec checking in build_table / build_model."""

from __future__ import annotations

import pytest

import embcompress
from embcompress import MODELS, TABLES, RegistryError, SpecError, build_model, build_table
from embcompress.registry import Registry, check_kwargs


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------


def _fresh() -> Registry:
    reg = Registry("widget")

    @reg.register("hashing.v1")
    class A:
        pass

    @reg.register("full.v1")
    class B:
        pass

    return reg


def test_register_and_get():
    reg = _fresh()
    cls = reg.get("hashing.v1")
    assert cls.__name__ == "A"
    assert cls.registry_name == "hashing.v1"
    assert reg.get("full.v1").registry_name == "full.v1"
    assert reg.names() == ["full.v1", "hashing.v1"]
    assert list(reg) == ["full.v1", "hashing.v1"]
    assert len(reg) == 2
    assert "hashing.v1" in reg
    assert "hashing.v2" not in reg


def test_register_returns_the_object_unchanged():
    reg = Registry("widget")

    class C:
        pass

    assert reg.register("c.v3")(C) is C


def test_duplicate_name_raises_and_keeps_first():
    reg = _fresh()
    first = reg.get("hashing.v1")

    class Other:
        pass

    with pytest.raises(RegistryError, match="duplicate.*'hashing.v1'"):
        reg.register("hashing.v1")(Other)
    assert reg.get("hashing.v1") is first
    assert len(reg) == 2
    # A new version of the same method is a different name.
    reg.register("hashing.v2")(Other)
    assert reg.get("hashing.v2") is Other


@pytest.mark.parametrize(
    "name",
    ["hashing", "hashing.v", "hashing.1", "hashing.V1", "Hashing.v1", "hashing-v1", "hashing_v1", "1hash.v1",
     "_hash.v1", "hash ing.v1", "hashing.v1.x", "hashing.v1a", ".v1", "", " hashing.v1", "hashing.v1 ",
     "a.b.v1"],
)
def test_badly_formed_names_raise(name):
    reg = Registry("widget")
    with pytest.raises(RegistryError, match="must look like"):
        reg.register(name)
    assert len(reg) == 0


def test_registering_a_class_under_a_second_name_is_refused():
    reg = _fresh()
    cls = reg.get("hashing.v1")
    with pytest.raises(RegistryError, match=r"already registered as widget 'hashing.v1'.*'hashing2.v1'"):
        reg.register("hashing2.v1")(cls)
    assert cls.registry_name == "hashing.v1"  # not rewritten
    assert "hashing2.v1" not in reg and len(reg) == 2

    class Sub(cls):  # a subclass is a class of its own, even though it inherits registry_name
        pass

    assert reg.register("hashing2.v1")(Sub) is Sub
    assert Sub.registry_name == "hashing2.v1" and cls.registry_name == "hashing.v1"


def test_builtin_table_keeps_its_name_when_registered_again():
    from embcompress.tables import HashingEmbedding

    with pytest.raises(RegistryError, match="'hashing.v1'.*'hashing2.v1'"):
        TABLES.register("hashing2.v1")(HashingEmbedding)
    assert HashingEmbedding.registry_name == "hashing.v1" and "hashing2.v1" not in TABLES
    with pytest.raises(ValueError, match=r"^hashing.v1: shared must be a bool"):
        HashingEmbedding([10, 20], 4, num_buckets=8, shared="no")


@pytest.mark.parametrize("name", ["a.v1", "hashing.v12", "tt_rec.v2", "qr2.v0"])
def test_well_formed_names_accepted(name):
    reg = Registry("widget")
    reg.register(name)(type("X", (), {}))
    assert reg.names() == [name]


def test_registry_error_is_lookup_and_value_error():
    assert issubclass(RegistryError, LookupError)
    assert issubclass(RegistryError, ValueError)
    assert issubclass(SpecError, ValueError)


def test_unknown_name_suggests_close_match():
    reg = _fresh()
    with pytest.raises(RegistryError) as info:
        reg.get("hashing.v2")
    msg = str(info.value)
    assert "'hashing.v2'" in msg
    assert "Did you mean 'hashing.v1'" in msg
    assert "widget" in msg
    # A KeyError must not leak as the context of the error.
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_unknown_name_typo_suggests_close_match():
    reg = _fresh()
    with pytest.raises(RegistryError, match="Did you mean 'full.v1'"):
        reg.get("ful.v1")


def test_unknown_name_without_close_match_lists_registered():
    reg = _fresh()
    with pytest.raises(RegistryError) as info:
        reg.get("zzz.v9")
    msg = str(info.value)
    assert "Did you mean" not in msg
    assert "full.v1" in msg and "hashing.v1" in msg


@pytest.mark.parametrize("name", [None, 1, ("hashing.v1",)])
def test_non_string_name_raises(name):
    with pytest.raises(RegistryError):
        _fresh().get(name)


def test_global_registry_suggests_close_match():
    embcompress.list_tables()
    with pytest.raises(RegistryError, match="Did you mean .*'hashing.v1'"):
        TABLES.get("hashing.v9")
    with pytest.raises(RegistryError, match="Did you mean 'dlrm.v1'"):
        MODELS.get("dlrm.v2")


def test_list_tables_and_models():
    tables = embcompress.list_tables()
    assert "full.v1" in tables
    assert "hashing.v1" in tables
    assert tables == sorted(tables)
    models = embcompress.list_models()
    assert "dlrm.v1" in models
    assert models == sorted(models)
    for name in tables:
        assert TABLES.get(name).registry_name == name
    for name in models:
        assert MODELS.get(name).registry_name == name


# ---------------------------------------------------------------------------------------------------------------
# check_kwargs
# ---------------------------------------------------------------------------------------------------------------


def _target(cardinalities, embedding_dim, *, num_buckets, seed=0, shared=False):
    pass


def test_check_kwargs_accepts_valid():
    check_kwargs(_target, {"num_buckets": 3}, "t", provided=("cardinalities", "embedding_dim"))
    check_kwargs(_target, {"num_buckets": 3, "seed": 1, "shared": True}, "t",
                 provided=("cardinalities", "embedding_dim"))


def test_check_kwargs_errors():
    prov = ("cardinalities", "embedding_dim")
    with pytest.raises(SpecError, match="unknown key 'sead'; did you mean 'seed'"):
        check_kwargs(_target, {"num_buckets": 3, "sead": 1}, "t", provided=prov)
    with pytest.raises(SpecError, match="missing required key.*'num_buckets'"):
        check_kwargs(_target, {"seed": 1}, "t", provided=prov)
    with pytest.raises(SpecError, match="'embedding_dim' is set by the caller"):
        check_kwargs(_target, {"num_buckets": 3, "embedding_dim": 4}, "t", provided=prov)


# ---------------------------------------------------------------------------------------------------------------
# build_table / build_model
# ---------------------------------------------------------------------------------------------------------------

CARDS = [1000, 50, 3]
DIM = 8


def test_build_table_valid_specs():
    t = build_table({"type": "hashing.v1", "num_buckets": 100}, CARDS, DIM)
    assert t.registry_name == "hashing.v1"
    assert t.embedding_dim == DIM
    t = build_table({"type": "hashing.v1", "budget_bytes": 4096}, CARDS, DIM)
    assert t.memory_report().total_bytes <= 4096
    t = build_table({"type": "full.v1"}, CARDS, DIM)
    assert t.registry_name == "full.v1"


def test_build_table_does_not_mutate_spec():
    spec = {"type": "hashing.v1", "num_buckets": 100, "seed": 3}
    before = dict(spec)
    build_table(spec, CARDS, DIM)
    assert spec == before


def test_build_table_unknown_key_suggests_close_match():
    with pytest.raises(SpecError) as info:
        build_table({"type": "hashing.v1", "num_bucket": 100}, CARDS, DIM)
    msg = str(info.value)
    assert "'num_bucket'" in msg
    assert "did you mean 'num_buckets'" in msg
    assert "hashing.v1" in msg


def test_build_table_unknown_key_with_budget_suggests_close_match():
    with pytest.raises(SpecError) as info:
        build_table({"type": "hashing.v1", "budget_bytes": 4096, "shard": True}, CARDS, DIM)
    msg = str(info.value)
    assert "'shard'" in msg and "'shared'" in msg


def test_build_table_budget_and_num_buckets_conflict():
    with pytest.raises(SpecError, match="'num_buckets'"):
        build_table({"type": "hashing.v1", "budget_bytes": 4096, "num_buckets": 10}, CARDS, DIM)


def test_build_table_missing_required_key():
    with pytest.raises(SpecError, match="missing required key.*'num_buckets'"):
        build_table({"type": "hashing.v1"}, CARDS, DIM)
    with pytest.raises(SpecError, match="missing"):
        build_table({"type": "hashing.v1", "seed": 1}, CARDS, DIM)


def test_build_table_without_type():
    with pytest.raises(SpecError, match="'type'"):
        build_table({"num_buckets": 100}, CARDS, DIM)


def test_build_table_spec_not_a_mapping():
    with pytest.raises(SpecError):
        build_table("hashing.v1", CARDS, DIM)
    with pytest.raises(SpecError):
        build_table([("type", "hashing.v1")], CARDS, DIM)


@pytest.mark.parametrize("key, value", [("cardinalities", [10, 20]), ("embedding_dim", 4)])
def test_build_table_caller_keys_in_spec(key, value):
    for spec in ({"type": "hashing.v1", "num_buckets": 100, key: value},
                 {"type": "hashing.v1", "budget_bytes": 4096, key: value},
                 {"type": "full.v1", key: value}):
        with pytest.raises(SpecError, match=f"'{key}'"):
            build_table(spec, CARDS, DIM)


def test_build_table_unknown_type():
    with pytest.raises(RegistryError, match="Did you mean .*'hashing.v1'"):
        build_table({"type": "hashing.v9", "num_buckets": 100}, CARDS, DIM)


def test_build_table_field_names():
    t = build_table({"type": "hashing.v1", "num_buckets": 100}, CARDS, DIM, field_names=["a", "b", "c"])
    assert list(t.field_names) == ["a", "b", "c"]


def _emb():
    return build_table({"type": "full.v1"}, [10, 20, 30], DIM)


def test_build_model_valid():
    model = build_model({"type": "dlrm.v1", "bottom_mlp": [16], "top_mlp": [16]}, _emb(), 13)
    assert model.registry_name == "dlrm.v1"


def test_build_model_unknown_key():
    with pytest.raises(SpecError) as info:
        build_model({"type": "dlrm.v1", "bottom_mlps": [16]}, _emb(), 13)
    msg = str(info.value)
    assert "'bottom_mlps'" in msg
    assert "did you mean 'bottom_mlp'" in msg
    assert "dlrm.v1" in msg


def test_build_model_errors():
    with pytest.raises(SpecError, match="'type'"):
        build_model({"bottom_mlp": [16]}, _emb(), 13)
    with pytest.raises(SpecError, match="'num_dense'"):
        build_model({"type": "dlrm.v1", "num_dense": 13}, _emb(), 13)
    with pytest.raises(SpecError, match="'embeddings'"):
        build_model({"type": "dlrm.v1", "embeddings": None}, _emb(), 13)
    with pytest.raises(RegistryError, match="Did you mean 'dlrm.v1'"):
        build_model({"type": "dlrm.v2"}, _emb(), 13)


def test_name_with_trailing_newline_is_rejected():
    with pytest.raises(RegistryError):
        Registry("x").register("hashing.v1\n")
