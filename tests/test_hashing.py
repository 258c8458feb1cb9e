"""Hashes kept on frozen configuration objects (jaxinfer/hashing.py): the variant, a backend's
capabilities and the Pallas backend hash as the dataclass-generated hash would (equal objects
equal hashes, a changed field another object and hash), compute it once, and copies, pickles
and ``dataclasses.replace`` never carry a kept hash over."""

from __future__ import annotations

import copy
import dataclasses
import functools
import pickle

import jax.numpy as jnp
import pytest

from jaxinfer.backends.base import Capabilities
from jaxinfer.backends.pallas.backend import PallasBackend
from jaxinfer.backends.pallas.config import TileConfig
from jaxinfer.hashing import hash_once
from jaxinfer.variants import AttentionVariant, make_variant


def _logits(x, qp, kp, qh, kh):
    return x - 0.1 * (qp - kp)


# (make an object, a field to change, its new value): each object built twice from scratch.
CASES = [
    (lambda: AttentionVariant(), "causal", True),
    (lambda: AttentionVariant(causal=True, window_left=8, logits_soft_cap=30.0, pos_encoding_mode="ALIBI"),
     "pos_encoding_mode", "ROPE_LLAMA"),
    (lambda: AttentionVariant(logits_transform=_logits, sm_scale=0.25), "sm_scale", 0.5),
    (lambda: Capabilities(), "max_group_size", 8),
    (lambda: Capabilities(dtypes=(jnp.bfloat16, jnp.float16), head_dims=(64, 128), archs=(90,)), "dtypes",
     (jnp.bfloat16,)),
    (lambda: PallasBackend(), "split_factor", 0),
    (lambda: PallasBackend(num_ctas=8, config=TileConfig(16, 16, 4, 1)), "config", TileConfig(32, 16, 4, 1)),
]
IDS = ["variant", "variant-alibi", "variant-callable", "caps", "caps-dtypes", "pallas", "pallas-config"]


def _fields_hash(obj) -> int:
    """The hash ``dataclasses`` generates for a frozen class: that of the compared fields' tuple."""
    return hash(tuple(getattr(obj, f.name) for f in dataclasses.fields(obj) if f.compare))


@pytest.mark.parametrize("make,field,value", CASES, ids=IDS)
def test_equal_objects_hash_equal_and_a_changed_field_differs(make, field, value):
    a, b = make(), make()
    assert a is not b and a == b
    assert hash(a) == hash(b) == _fields_hash(a) == hash(a)  # twice: the kept value is the same
    changed = dataclasses.replace(b, **{field: value})
    assert changed != a and getattr(changed, field) == value
    assert hash(changed) == _fields_hash(changed) != hash(a)
    assert {a: "a", changed: "changed"}[make()] == "a"  # an equal object finds the entry
    assert {a: "a", changed: "changed"}[dataclasses.replace(make(), **{field: value})] == "changed"


@pytest.mark.parametrize("make,field,value", CASES, ids=IDS)
def test_copies_and_pickles_hash_anew(make, field, value):
    obj = make()
    hash(obj)
    # A kept hash is this process's (strings hash differently in another one): make it wrong to
    # see that no copy takes it over.
    object.__setattr__(obj, "_kept_hash", 12345)
    for c in (copy.copy(obj), copy.deepcopy(obj), pickle.loads(pickle.dumps(obj))):
        assert c == obj and hash(c) == _fields_hash(obj) != 12345
    assert hash(dataclasses.replace(obj)) == _fields_hash(obj)


def test_pickle_roundtrip_of_a_variant_keeps_its_fields():
    v = AttentionVariant(causal=True, window_left=16, logits_soft_cap=0.0, sm_scale=2, rope_theta=5e5)
    hash(v)
    back = pickle.loads(pickle.dumps(v))
    assert back == v and hash(back) == hash(v)
    assert dataclasses.asdict(back) == dataclasses.asdict(v) and back.logits_soft_cap is None
    assert back.replace(causal=False) == AttentionVariant(window_left=16, sm_scale=2.0, rope_theta=5e5)


def test_normalised_variants_hash_equal():
    assert AttentionVariant(logits_soft_cap=0.0) == AttentionVariant()
    assert hash(AttentionVariant(logits_soft_cap=0.0)) == hash(AttentionVariant())
    assert hash(AttentionVariant(sm_scale=1)) == hash(AttentionVariant(sm_scale=1.0))


class _Counted:
    """A field value that counts how often it is hashed."""

    calls = 0

    def __hash__(self):
        type(self).calls += 1
        return 7


def test_hash_is_computed_once_per_object():
    caps = Capabilities(dtypes=(_Counted(),))
    before = _Counted.calls
    assert hash(caps) == hash(caps) == hash(caps)
    assert _Counted.calls == before + 1
    dataclasses.replace(caps).__hash__()
    assert _Counted.calls == before + 2, "a replaced object hashes its own fields"


def test_an_unhashable_field_still_raises_every_time():
    caps = Capabilities(head_dims=[64, 128])
    for _ in range(2):
        with pytest.raises(TypeError, match="unhashable"):
            hash(caps)


def test_a_kept_hash_is_invisible_to_fields_repr_and_eq():
    a, b = PallasBackend(num_ctas=4), PallasBackend(num_ctas=4)
    hash(a)
    assert a == b and repr(a) == repr(b) and dataclasses.asdict(a) == dataclasses.asdict(b)
    assert [f.name for f in dataclasses.fields(a)] == [f.name for f in dataclasses.fields(b)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.num_ctas = 8


def test_lru_cache_hits_an_equal_object():
    calls = []

    @functools.lru_cache(maxsize=None)
    def judge(v):
        calls.append(v)
        return v.causal

    assert judge(AttentionVariant(causal=True)) and judge(AttentionVariant(causal=True))
    assert not judge(AttentionVariant())
    assert len(calls) == 2


def test_hash_once_refuses_what_it_cannot_keep():
    with pytest.raises(TypeError, match="frozen"):
        hash_once(dataclasses.dataclass(type("Mutable", (), {"__annotations__": {"x": int}})))
    with pytest.raises(TypeError, match="frozen"):
        hash_once(type("Plain", (), {}))
    with pytest.raises(TypeError, match="frozen"):
        hash_once(dataclasses.dataclass(frozen=True, slots=True)(type("Slots", (), {"__annotations__": {"x": int}})))
    with pytest.raises(TypeError, match="pickling"):
        hash_once(dataclasses.dataclass(frozen=True)(type("Own", (), {"__annotations__": {"x": int},
                                                                      "__reduce__": lambda self: (int, ())})))


def test_make_variant_keeps_the_users_object_unless_an_option_overrides_it():
    v = AttentionVariant(logits_transform=_logits, sm_scale=0.25)
    hash(v)
    defaults = dict(causal=False, window_left=-1, logits_soft_cap=None, sm_scale=None, pos_encoding_mode="NONE",
                    rope_scale=None, rope_theta=None)
    assert make_variant(v, **defaults) is v
    causal = make_variant(v, **{**defaults, "causal": True})
    assert causal == AttentionVariant(causal=True, logits_transform=_logits, sm_scale=0.25) != v
    assert hash(causal) == _fields_hash(causal) != hash(v)
    with pytest.raises(ValueError, match="window_left"):
        make_variant(v, **{**defaults, "window_left": -2})
