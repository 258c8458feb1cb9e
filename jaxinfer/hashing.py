"""Frozen dataclasses whose hash is computed once per object.

``plan()`` looks its static configuration objects (the attention variant, a backend and its
capabilities) up in ``functools.lru_cache`` tables on every call, and jit hashes the variant as a
static argument. The ``__hash__`` that ``dataclasses`` generates for a frozen class hashes every
field again on each lookup (0.3-0.7 us per object on a 2-core Xeon VM; a field holding
``jnp.bfloat16`` costs 0.2 us alone): :func:`hash_once` keeps the first result on the object.
"""

from __future__ import annotations

_KEPT = "_kept_hash"


def hash_once(cls: type) -> type:
    """Class decorator, below ``@dataclasses.dataclass(frozen=True)``: the generated hash (of the
    tuple of the compared fields), computed on first use and kept on the object.

    Equal objects still hash equal and equality is unchanged (the generated ``__eq__`` compares
    fields only). ``dataclasses.replace`` builds a new object, which hashes anew. Copies and
    pickles leave the kept hash behind (a string's hash differs between processes), so the copy
    hashes anew too.

    Example::

        @hash_once
        @dataclasses.dataclass(frozen=True)
        class Config:
            block: int = 64

    Raises:
      TypeError: ``cls`` is not a frozen ``eq`` dataclass with ``__dict__`` and its generated
        hash, or defines its own ``__getstate__``/``__reduce__`` (whose state would keep the hash).
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not (params.frozen and params.eq) or "__slots__" in cls.__dict__:
        raise TypeError(f"hash_once needs a frozen dataclass with eq=True and no __slots__, got {cls.__name__}")
    if any(name in cls.__dict__ for name in ("__getstate__", "__reduce__", "__reduce_ex__")):
        raise TypeError(f"hash_once cannot keep {cls.__name__}'s own pickling methods")
    fields_hash = cls.__hash__
    if fields_hash is None:
        raise TypeError(f"{cls.__name__} has no generated __hash__ to keep")

    def __hash__(self) -> int:
        try:
            return self._kept_hash
        except AttributeError:
            value = fields_hash(self)
            object.__setattr__(self, _KEPT, value)  # frozen: bypass the generated __setattr__
            return value

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop(_KEPT, None)
        return state

    cls.__hash__ = __hash__
    cls.__getstate__ = __getstate__
    return cls
