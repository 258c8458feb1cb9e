"""Pallas kernels of jaxinfer (Triton lowering on GPU, interpret mode elsewhere).

- :mod:`jaxinfer.pallas.attention`: block-sparse paged attention over planner work tiles.
- :mod:`jaxinfer.pallas.merge`: merge-state kernels (split-KV partials, public merge_state(s)).
- :mod:`jaxinfer.pallas.config`: frozen tile config and its heuristic.
- :mod:`jaxinfer.pallas.backend`: the ``"pallas"`` backend object (``get_backend``).
"""
