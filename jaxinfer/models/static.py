"""A model's static structure as a ``jax.jit`` static argument (:class:`ModelDef`), hashed once.

The serving engine's step (:func:`jaxinfer.serve.serve_step`), the dense serving loop and the
tensor-parallel step (:mod:`jaxinfer.parallel`) take a model as its structure (static) and its
parameter arrays (traced).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
from flax import nnx

from jaxinfer.models.llama import paged_logits
from jaxinfer.nn.attention import StepBatch


class ModelDef:
    """A model's static structure for ``jax.jit``: its nnx graph definition and the tree structure
    of its parameters, hashed once.

    A jitted function hashes its static arguments on every call; an nnx ``GraphDef`` hashes by
    walking the whole graph (SmolLM2-135M's 30 layers: about 3 ms of host time per call). One
    ``ModelDef`` per distinct model structure (:func:`split_model` interns them), so calls
    compare it by identity. The parameters travel as a flat list of arrays (flattening an
    ``nnx.State`` on every call costs more than a list).
    """

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, ModelDef) and self._hash == other._hash
                                 and self.treedef == other.treedef and self.graphdef == other.graphdef)

    def params(self, leaves: Sequence[jax.Array]):
        """The ``nnx.State`` of ``leaves`` (as :func:`split_model` returned them)."""
        return jax.tree.unflatten(self.treedef, leaves)

    def paged_logits(self, leaves: Sequence[jax.Array], caches, tokens: jax.Array, batch: StepBatch):
        """:func:`jaxinfer.models.llama.paged_logits` of this structure with parameters ``leaves``
        (to trace inside a jitted step): ``(logits [Bc, vocab] float32, caches)``."""
        return paged_logits(self.graphdef, self.params(leaves), caches, tokens, batch)


@functools.lru_cache(maxsize=16)
def _intern(graphdef, treedef) -> ModelDef:
    return ModelDef(graphdef, treedef)


def split_model(model: nnx.Module) -> tuple[ModelDef, list[jax.Array]]:
    """``nnx.split(model)`` as ``(ModelDef, parameter arrays)``: the same ``ModelDef`` object for
    every model of the same structure (so a jitted step finds its compiled programs by identity)."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return _intern(graphdef, treedef), leaves
