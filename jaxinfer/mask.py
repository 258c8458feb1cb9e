"""Bit-packed custom masks: FlashInfer's ``packbits``/``segment_packbits`` layout, and its inverse.

FlashInfer's prefill wrappers take a custom mask either as bools (``custom_mask``) or packed
eight keys to a byte (``packed_custom_mask``, uint8): each request's row-major
``[qo_len, kv_len]`` mask is flattened and packed on its own, little-endian within a byte (key
``8 i + j`` is bit ``j`` of byte ``i``), padded with zero bits to a whole byte, and the requests'
byte strings are concatenated (FlashInfer's ``segment_packbits(mask, indptr, bitorder="little")``).
jaxinfer's kernels read one byte per key, so a packed mask is unpacked on the host when the plan is
made.
"""

from __future__ import annotations

import numpy as np

BITORDERS = ("big", "little")


def _check_bitorder(bitorder: str) -> None:
    if bitorder not in BITORDERS:
        raise ValueError(f"bitorder must be one of {BITORDERS}, got {bitorder!r}")


def packbits(x, bitorder: str = "big") -> np.ndarray:
    """Pack a bool array's flattened entries eight to a byte (FlashInfer's ``packbits``).

    Args:
      x: bool array of any shape (host; flattened row-major).
      bitorder: ``"big"`` (FlashInfer's and numpy's default) or ``"little"`` (what the attention
        masks use).

    Returns:
      ``[ceil(x.size / 8)]`` uint8.

    Raises:
      ValueError: ``x`` is not bool, or an unknown ``bitorder``.
    """
    _check_bitorder(bitorder)
    x = np.asarray(x)
    if x.dtype != np.bool_:
        raise ValueError(f"x must be a bool array, got dtype {x.dtype}")
    return np.packbits(x.reshape(-1), bitorder=bitorder)


def segment_packbits(x, indptr, bitorder: str = "big") -> tuple[np.ndarray, np.ndarray]:
    """Pack each segment ``x[indptr[i]:indptr[i+1]]`` on its own (FlashInfer's ``segment_packbits``).

    Args:
      x: ``[indptr[-1]]`` bool (host).
      indptr: ``[n+1]`` non-decreasing int segment offsets starting at 0.
      bitorder: as in :func:`packbits`.

    Returns:
      ``(packed [sum ceil(len_i / 8)] uint8, packed_indptr [n+1] int32)``: segment ``i`` is
      ``packed[packed_indptr[i]:packed_indptr[i+1]]``.

    Raises:
      ValueError: ``x`` not bool or not of ``indptr[-1]`` entries, ``indptr`` not a valid offset
        array, an unknown ``bitorder``.
    """
    _check_bitorder(bitorder)
    x = np.asarray(x).reshape(-1)
    if x.dtype != np.bool_:
        raise ValueError(f"x must be a bool array, got dtype {x.dtype}")
    lengths = _segment_lengths(indptr, "indptr")
    if int(lengths.sum()) != x.size:
        raise ValueError(f"x has {x.size} entries, indptr[-1] = {int(lengths.sum())}")
    starts = np.concatenate([[0], np.cumsum(lengths)])
    parts = [np.packbits(x[a:b], bitorder=bitorder) for a, b in zip(starts[:-1], starts[1:])]
    packed_indptr = np.concatenate([[0], np.cumsum([(n + 7) // 8 for n in lengths])]).astype(np.int32)
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint8)), packed_indptr


def _segment_lengths(indptr, name: str) -> np.ndarray:
    indptr = np.asarray(indptr)
    if indptr.ndim != 1 or indptr.size == 0 or not np.issubdtype(indptr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {indptr.shape} dtype {indptr.dtype}")
    lengths = np.diff(indptr.astype(np.int64))
    if indptr[0] != 0 or np.any(lengths < 0):
        raise ValueError(f"{name} must start at 0 and be non-decreasing")
    return lengths


def unpack_segments(packed, lengths, *, name: str = "packed_custom_mask") -> np.ndarray:
    """The flat bool mask of per-request bit strings packed as :func:`segment_packbits` does
    (little-endian), on the host.

    Args:
      packed: ``[sum ceil(lengths / 8)]`` uint8 (host).
      lengths: ``[B]`` bits of each request (``qo_len * kv_len``).
      name: the caller's argument name, for messages.

    Returns:
      ``[sum lengths]`` bool, the requests' masks concatenated.

    Raises:
      ValueError: ``packed`` not uint8 or not of the expected byte count.
    """
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(f"{name} must be a 1-D uint8 array, got shape {packed.shape} dtype {packed.dtype}")
    lengths = np.asarray(lengths, np.int64)
    nbytes = (lengths + 7) // 8
    if packed.size != int(nbytes.sum()):
        raise ValueError(f"{name} has {packed.size} bytes; the batch's masks (qo_len x kv_len bits per request, "
                         f"each padded to whole bytes) take {int(nbytes.sum())}")
    bits = np.unpackbits(packed, bitorder="little")
    starts = np.concatenate([[0], np.cumsum(nbytes)]) * 8
    return np.concatenate([bits[s : s + n] for s, n in zip(starts[:-1], lengths)] or [np.zeros(0, np.uint8)]).astype(bool)


def resolve_custom_mask(custom_mask, packed_custom_mask, lengths_fn):
    """The bool ``custom_mask`` a plan takes, from FlashInfer's two ways of giving it.

    Args:
      custom_mask: flat bool or ``None``; packed_custom_mask: little-endian packed uint8 or ``None``.
      lengths_fn: ``() -> [B]`` bits of each request (``qo_len * kv_len``), called only to unpack.

    Raises:
      ValueError: both are given (say which one to keep), or the packed mask does not fit the batch.
    """
    if packed_custom_mask is None:
        return custom_mask
    if custom_mask is not None:
        raise ValueError("pass custom_mask or packed_custom_mask, not both")
    return unpack_segments(packed_custom_mask, lengths_fn())
