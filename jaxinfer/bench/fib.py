"""FlashInfer-Bench trace sets from benchmark records (``jaxinfer-bench --fib-out DIR``).

FlashInfer-Bench 0.1.2 (https://github.com/flashinfer-ai/flashinfer-bench) keeps a *trace set*
as a directory: ``definitions/<op_type>/<name>.json`` (one kernel signature: axes, typed
inputs/outputs, a Python reference), ``workloads/<op_type>/<name>.jsonl`` (concrete axis values
and input descriptors, with index arrays in ``blob/workloads/...safetensors``) and
``traces/<op_type>/<name>.jsonl`` (one evaluation of a solution on a workload: status,
correctness, latency, environment). This module writes that layout for the benchmark's
workloads that are FlashInfer-Bench ops: paged decode (``gqa_paged_decode_h32_kv8_d128_ps16``),
paged prefill (``gqa_paged_prefill_causal_...``) and ragged prefill
(``gqa_ragged_prefill_causal_...``), bf16, plain softmax attention. Each backend is a solution
named ``jaxinfer_<backend>`` (the cuDNN peer ``jax_cudnn_dense``); the workloads whose ops FlashInfer-Bench does not define (cascade
levels, block-sparse, fused RoPE, an fp8 cache) are left out, and so are runs without a verdict
(``unsupported``, or ``unchecked``: no reference to judge correctness by).

Two departures from FlashInfer-Bench's own definitions, both needed to describe jaxinfer's
inputs exactly: paged definitions take ``kv_last_page_len`` (tokens in each request's last page,
FlashInfer's plan argument; FlashInfer-Bench's definitions assume full pages), and the correctness
metric is jaxinfer's ``max|o - ref| / max|ref|`` (stored as ``max_relative_error``;
``max_absolute_error`` is not measured and recorded as NaN, as the schema allows).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from jaxinfer.bench.workloads import DecodeWorkload, PageTable, PrefillWorkload, Workload

FIB_VERSION = "0.1.2"  # the FlashInfer-Bench schema these files follow
SOLUTION_PREFIX = "jaxinfer_"
PEER_SOLUTIONS = {"cudnn": "jax_cudnn_dense"}  # the runner's peers: solutions, not jaxinfer backends


def solution_name(backend: str) -> str:
    """FlashInfer-Bench solution name of a runner backend: ``jaxinfer_<backend>`` for jaxinfer's
    own, ``jax_cudnn_dense`` for the cuDNN peer (``jax.nn.dot_product_attention`` on the padded
    dense batch), so that :func:`jaxinfer.apply` never takes a peer for a backend."""
    return PEER_SOLUTIONS.get(backend, SOLUTION_PREFIX + backend)

# jaxinfer-bench record status -> FlashInfer-Bench EvaluationStatus (others: no trace).
_STATUS = {"ok": "PASSED", "mismatch": "INCORRECT_NUMERICAL", "error": "RUNTIME_ERROR"}

_CONST_AXES = ("num_qo_heads", "num_kv_heads", "head_dim")

_REFERENCE = '''import math
import torch


def _attend(q, k, v, sm_scale, causal):
    # q [m, Hq, D], k/v [n, Hkv, D] -> output [m, Hq, D] (bf16), lse [m, Hq] (float32, base 2)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    logits = torch.einsum("mhd,nhd->hmn", q.float(), k) * sm_scale
    if causal:
        m, n = q.shape[0], k.shape[0]
        keep = torch.arange(n)[None, :] <= torch.arange(m)[:, None] + (n - m)
        logits = logits.masked_fill(~keep.to(logits.device), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.einsum("hmn,nhd->mhd", torch.softmax(logits, dim=-1), v)
    return out.to(torch.bfloat16), (lse / math.log(2.0)).transpose(0, 1)


def _paged_tokens(cache, kv_indptr, kv_indices, kv_last_page_len, b):
    pages = kv_indices[kv_indptr[b]:kv_indptr[b + 1]].long()
    n = (pages.numel() - 1) * cache.shape[1] + int(kv_last_page_len[b])
    return cache[pages].reshape(-1, *cache.shape[2:])[:n]
'''

_RUN = {
    "gqa_paged_decode": '''

def run(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, sm_scale):
    outs, lses = [], []
    for b in range(q.shape[0]):
        k = _paged_tokens(k_cache, kv_indptr, kv_indices, kv_last_page_len, b)
        v = _paged_tokens(v_cache, kv_indptr, kv_indices, kv_last_page_len, b)
        o, lse = _attend(q[b:b + 1], k, v, sm_scale, False)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)
''',
    "gqa_paged_prefill": '''

def run(q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, sm_scale):
    outs, lses = [], []
    for b in range(qo_indptr.numel() - 1):
        k = _paged_tokens(k_cache, kv_indptr, kv_indices, kv_last_page_len, b)
        v = _paged_tokens(v_cache, kv_indptr, kv_indices, kv_last_page_len, b)
        o, lse = _attend(q[qo_indptr[b]:qo_indptr[b + 1]], k, v, sm_scale, CAUSAL)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)
''',
    "gqa_ragged_prefill": '''

def run(q, k, v, qo_indptr, kv_indptr, sm_scale):
    outs, lses = [], []
    for b in range(qo_indptr.numel() - 1):
        kb, vb = k[kv_indptr[b]:kv_indptr[b + 1]], v[kv_indptr[b]:kv_indptr[b + 1]]
        o, lse = _attend(q[qo_indptr[b]:qo_indptr[b + 1]], kb, vb, sm_scale, CAUSAL)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)
''',
}


def op_type(workload: Workload) -> str | None:
    """FlashInfer-Bench ``op_type`` of ``workload``, or ``None`` when it defines no such op."""
    if isinstance(workload, DecodeWorkload):
        return None if workload.rope_theta is not None else "gqa_paged_decode"
    if isinstance(workload, PrefillWorkload):
        return "gqa_paged_prefill" if workload.paged else "gqa_ragged_prefill"
    return None


def _tensor(shape: Sequence[str] | None, dtype: str, description: str | None = None) -> dict:
    out = {"shape": None if shape is None else list(shape), "dtype": dtype}
    if description:
        out["description"] = description
    return out


def definition(workload: Workload) -> dict:
    """The FlashInfer-Bench Definition (JSON-able) of ``workload``'s op and fixed geometry.

    Raises:
      ValueError: ``workload`` is not a FlashInfer-Bench op (see :func:`op_type`).
    """
    op = op_type(workload)
    if op is None:
        raise ValueError(f"workload {workload.name!r} ({workload.definition}) has no FlashInfer-Bench op")
    heads = ("num_qo_heads", "head_dim")
    kv_heads = ("num_kv_heads", "head_dim")
    axes = {a: {"type": "const", "value": getattr(workload, a)} for a in _CONST_AXES}
    sm_scale = _tensor(None, "float32", "softmax scale, 1/sqrt(head_dim) in these workloads")
    outputs = {"output": _tensor(("total_q", *heads), "bfloat16"),
               "lse": _tensor(("total_q", "num_qo_heads"), "float32", "log-sum-exp of the scaled logits, base 2")}
    rows = "batch_size" if op == "gqa_paged_decode" else "total_q"
    outputs = {"output": _tensor((rows, *heads), "bfloat16"),
               "lse": _tensor((rows, "num_qo_heads"), "float32", "log-sum-exp of the scaled logits, base 2")}
    if op == "gqa_ragged_prefill":
        axes.update({a: {"type": "var"} for a in ("total_q", "total_kv", "len_indptr")})
        inputs = {"q": _tensor(("total_q", *heads), "bfloat16"), "k": _tensor(("total_kv", *kv_heads), "bfloat16"),
                  "v": _tensor(("total_kv", *kv_heads), "bfloat16"),
                  "qo_indptr": _tensor(("len_indptr",), "int32"), "kv_indptr": _tensor(("len_indptr",), "int32")}
        constraints = ["total_q == qo_indptr[-1].item()", "total_kv == kv_indptr[-1].item()"]
    else:
        axes["page_size"] = {"type": "const", "value": workload.page_size}
        axes.update({a: {"type": "var"} for a in dict.fromkeys((rows, "batch_size", "num_pages", "len_indptr",
                                                                 "num_kv_indices"))})
        cache = _tensor(("num_pages", "page_size", *kv_heads), "bfloat16", "paged KV cache, NHD layout")
        inputs = {"q": _tensor((rows, *heads), "bfloat16"), "k_cache": cache, "v_cache": cache}
        if op == "gqa_paged_prefill":
            inputs["qo_indptr"] = _tensor(("len_indptr",), "int32")
        inputs.update({"kv_indptr": _tensor(("len_indptr",), "int32"),
                       "kv_indices": _tensor(("num_kv_indices",), "int32"),
                       "kv_last_page_len": _tensor(("batch_size",), "int32", "tokens in each request's last page")})
        constraints = ["len_indptr == batch_size + 1", "num_kv_indices == kv_indptr[-1].item()"]
        if op == "gqa_paged_prefill":
            constraints.append("total_q == qo_indptr[-1].item()")
    inputs["sm_scale"] = sm_scale
    causal = getattr(workload, "causal", False)
    reference = _REFERENCE + _RUN[op].replace("CAUSAL", str(causal))
    return {
        "name": fib_name(workload),
        "op_type": op,
        "axes": axes,
        "inputs": inputs,
        "outputs": outputs,
        "reference": reference,
        "tags": ["jaxinfer"],
        "description": f"jaxinfer-bench workload family of {workload.definition} (bf16, NHD, plain softmax)",
        "constraints": constraints,
    }


def fib_name(workload: Workload) -> str:
    """FlashInfer-Bench's name of ``workload``'s definition: ``op_type`` plus the mask and the
    fixed geometry, e.g. ``gqa_paged_decode_h32_kv8_d128_ps16``, ``gqa_ragged_prefill_causal_h32_kv8_d128``."""
    op = op_type(workload)
    geometry = f"h{workload.num_qo_heads}_kv{workload.num_kv_heads}_d{workload.head_dim}"
    if op == "gqa_paged_decode":
        return f"{op}_{geometry}_ps{workload.page_size}"
    mask = "causal" if workload.causal else "noncausal"
    page = f"_ps{workload.page_size}" if workload.paged else ""
    return f"{op}_{mask}_{geometry}{page}"


def _index_arrays(workload: Workload, seed: int) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Concrete var axes and the int32 index inputs of ``workload`` as built with ``seed`` (the
    same page table the benchmark ran on: :meth:`Workload.build` draws it from ``seed``)."""
    rng = np.random.default_rng(seed)
    if isinstance(workload, DecodeWorkload):
        table = PageTable.shuffled(workload.kv_lens(), workload.page_size, rng)
        rows, arrays = {"batch_size": workload.batch_size}, {}
    else:
        b, kv_len = workload.batch_size, workload.prefix_len + workload.qo_len
        arrays = {"qo_indptr": np.arange(b + 1, dtype=np.int32) * workload.qo_len}
        rows = {"total_q": b * workload.qo_len, "batch_size": b}
        if not workload.paged:
            kv_indptr = np.arange(b + 1, dtype=np.int32) * kv_len
            return ({"total_q": rows["total_q"], "total_kv": int(kv_indptr[-1]), "len_indptr": b + 1},
                    {**arrays, "kv_indptr": kv_indptr})
        table = PageTable.shuffled(np.full(b, kv_len), workload.page_size, rng)
    arrays.update(kv_indptr=table.indptr, kv_indices=table.indices, kv_last_page_len=table.last_page_len)
    axes = {**rows, "num_pages": table.num_pages, "len_indptr": table.indptr.size,
            "num_kv_indices": table.indices.size}
    return axes, arrays


def workload_uuid(workload: Workload, seed: int) -> str:
    """A stable id of (definition, workload, size, seed): the same run writes the same ids."""
    key = json.dumps([fib_name(workload), workload.name, workload.axes(), seed], sort_keys=True)
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "jaxinfer-bench:" + key))


def workload_entry(workload: Workload, seed: int, root: Path) -> dict:
    """The FlashInfer-Bench Workload of ``workload`` (JSON-able); writes its index arrays to
    ``root/blob/workloads/<op_type>/<name>/<uuid>.safetensors`` (paths in the entry are relative
    to ``root``, as FlashInfer-Bench resolves them)."""
    from safetensors.numpy import save_file

    axes, arrays = _index_arrays(workload, seed)
    wid = workload_uuid(workload, seed)
    rel = Path("blob", "workloads", op_type(workload), fib_name(workload), f"{wid}.safetensors")
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.int32) for k, v in arrays.items()}, str(root / rel))
    inputs = {name: {"type": "random"} for name in definition(workload)["inputs"] if name != "sm_scale"}
    inputs.update({k: {"type": "safetensors", "path": rel.as_posix(), "tensor_key": k} for k in arrays})
    inputs["sm_scale"] = {"type": "scalar", "value": 1.0 / math.sqrt(workload.head_dim)}
    return {"axes": axes, "inputs": inputs, "uuid": wid}


def _or_nan(x) -> float:
    return float("nan") if x is None else float(x)


def trace(record: dict, workload: dict, definition_name: str) -> dict | None:
    """The FlashInfer-Bench Trace (JSON-able) of one benchmark record, or ``None`` when the
    record has no verdict to report (``unsupported``, ``unchecked``)."""
    status = _STATUS.get(record["status"])
    if status is None:
        return None
    errors = [e for e in (record.get("max_error"), record.get("max_error_f64")) if e is not None]
    evaluation = {
        "status": status,
        "environment": {"hardware": record["device"],
                        "libs": {"jax": record.get("jax_version") or "", "jaxinfer": record.get("git_commit") or ""}},
        "timestamp": record["date"],
        "log": record.get("reason") or "",
    }
    if status != "RUNTIME_ERROR":
        evaluation["correctness"] = {
            "max_relative_error": _or_nan(max(errors) if errors else None),
            "max_absolute_error": float("nan"),
            "extra": {"metric": "max|o - ref| / max|ref|", "max_error": record.get("max_error"),
                      "max_error_f64": record.get("max_error_f64")},
        }
    if status == "PASSED":
        latency, ref = record["latency_ms"], record.get("reference_latency_ms")
        evaluation["performance"] = {"latency_ms": latency, "reference_latency_ms": ref or 0.0,
                                     "speedup_factor": ref / latency if ref else 0.0}
    return {"definition": definition_name, "workload": workload,
            "solution": solution_name(record["backend"]), "evaluation": evaluation}


def _json(obj) -> str:
    # FlashInfer-Bench serializes NaN as the string "NaN" (pydantic ser_json_inf_nan="strings").
    def fix(x):
        if isinstance(x, float) and math.isnan(x):
            return "NaN"
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fix(v) for v in x]
        return x
    return json.dumps(fix(obj), allow_nan=False)


def write_trace_set(records: Iterable[dict], workloads: Sequence[Workload], out_dir: Path, *, seed: int) -> list[Path]:
    """Write the FlashInfer-Bench trace set of ``records`` (from
    :func:`jaxinfer.bench.harness.run_benchmark` over ``workloads`` with ``seed``) under
    ``out_dir``; returns the files written. Records of workloads FlashInfer-Bench has no op for,
    of an fp8 cache, or without a verdict are left out. Existing files of the same definitions
    are replaced."""
    by_name = {w.name: w for w in workloads}
    definitions, entries, traces = {}, {}, {}
    for record in records:
        w = by_name.get(record["workload"])
        if w is None or op_type(w) is None or record.get("kv_dtype", "bf16") != "bf16":
            continue
        name = fib_name(w)
        definitions.setdefault(name, definition(w))
        entries.setdefault(name, {})
        if w.name not in entries[name]:
            entries[name][w.name] = workload_entry(w, seed, out_dir)
        t = trace(record, entries[name][w.name], name)
        if t is not None:
            traces.setdefault(name, []).append(t)
    written = []
    for name, d in definitions.items():
        op = d["op_type"]
        path = out_dir / "definitions" / op / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(d, indent=2) + "\n")
        written.append(path)
        rows = {"workloads": [{"definition": name, "workload": e} for e in entries[name].values()],
                "traces": traces.get(name, [])}
        for kind, lines in rows.items():
            if not lines:
                continue
            path = out_dir / kind / op / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(_json(x) + "\n" for x in lines))
            written.append(path)
    return written
