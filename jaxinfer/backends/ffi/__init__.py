"""jaxinfer's CUDA XLA-FFI path: FlashAttention kernels of ``jaxinfer/csrc/`` as the ``"fa2"``/``"fa3"`` backends.

``build`` compiles ``jaxinfer/csrc/`` with nvcc on first use (cached), ``ops`` holds the ``ffi_call``
wrappers, ``backend`` the backend objects. Importing this package needs neither nvcc nor a GPU.
"""
