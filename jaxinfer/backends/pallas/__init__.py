"""Pallas kernels of jaxinfer (Triton lowering on GPU, interpret mode elsewhere).

- :mod:`jaxinfer.backends.pallas.attention`: block-sparse paged attention over planner work tiles.
- :mod:`jaxinfer.backends.pallas.merge`: merge-state kernels (split-KV partials, public merge_state(s)).
- :mod:`jaxinfer.backends.pallas.config`: frozen tile config and its heuristic.
- :mod:`jaxinfer.backends.pallas.backend`: the ``"pallas"`` backend object (``get_backend``).
"""
