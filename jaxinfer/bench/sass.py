"""Offline SASS of the Pallas decode and MLA kernels: registers, spills and the key-step loop's
instructions without a GPU, to compare kernel variants before spending device time.

Two halves in two interpreters (jaxlib's Triton and Python's ``triton`` are separate builds):

- ``dump`` (jaxinfer's environment): plans decode_uniform's geometry (Hq 32, Hkv 8, D 128, page
  size 16, NHD, bf16 q; batch 4: the kernel depends only on the static kernel spec and tile
  config) through :class:`jaxinfer.BatchDecodeWithPagedKVCacheWrapper` for each KV dtype, and
  case ``mla`` DeepSeek-V3's MLA decode (128 heads, ``Dc`` 512, ``Dp`` 64, page size 64, bf16)
  through :class:`jaxinfer.BatchMLAPagedAttentionWrapper`; exports the kernel for an abstract H100
  with the Triton lowering forced, and writes the Triton module that Pallas hands to XLA as text
  (``<out>/<case>.ttir``, ``meta.json``).
- ``compile`` (an interpreter with ``triton==3.6.0``, the GPU machine's, given by
  ``--triton-python``): runs Triton's TTIR passes (XLA runs the same pipeline; ``triton.compile``
  skips them for an IR file), compiles for sm_90a with the config's warps and stages, and writes
  ``.ttgir``, ``.ptx``, ``.sass`` with the registers and spills of ``ptxas -v``.

``report`` counts, in each case's SASS, the inner backward-branch loops (the key steps: the first
is the mask-free loop, the second the masked one) by instruction class, per key and per KV byte.
jaxlib bundles its own Triton and ptxas, so counts may differ from the device's build
(benchmarks/decisions/pallas.md compares them with ncu).

Usage::

    python -m jaxinfer.bench.sass --out build/sass --triton-python /path/to/venv/bin/python \\
        [--cases bf16,e4m3] [--block-n N --warps W --stages S]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys

CASES = {"bf16": "bfloat16", "e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2", "mla": None}
GEOMETRY = dict(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16, batch=4, kv_len=4096)
# The MLA case: DeepSeek-V3's decode (jaxinfer.bench.mla's full-size cases), bf16.
MLA_GEOMETRY = dict(num_heads=128, head_dim_ckv=512, head_dim_kpe=64, page_size=64, batch=4, kv_len=4096)
# SASS opcode classes, first match wins.
CLASSES = [
    ("LDGSTS", r"LDGSTS"), ("LDG", r"LDG"), ("LDS.U8", r"LDS\.U8"), ("LDSM", r"LDSM"), ("LDS", r"LDS"),
    ("STS", r"STS"), ("STL (spill)", r"STL"), ("LDL (spill)", r"LDL"), ("F2FP", r"F2FP"), ("F2F", r"F2F"),
    ("PRMT", r"PRMT"), ("HMMA", r"HMMA"), ("HGMMA", r"HGMMA"), ("FMUL/FFMA/FADD", r"F(MUL|FMA|ADD)"),
    ("FMNMX", r"FMNMX"), ("MUFU", r"MUFU"), ("SHFL", r"SHFL"), ("IMAD.MOV", r"IMAD\.MOV"),
    ("integer", r"(IMAD|IADD3|LEA|LOP3|SHF|ISETP|SEL|IMNMX|VIMNMX)"), ("MOV", r"MOV"), ("BAR", r"BAR"),
    ("control", r"(BRA|BSSY|BSYNC|EXIT|WARPSYNC|NOP|DEPBAR|LDGDEPBAR)"), ("other", r""),
]


def dump(out: str, cases: list[str], overrides: dict) -> None:
    """Write ``<out>/<case>.ttir`` and ``meta.json`` (the tile config of each case, its KV bytes a
    key); ``overrides``: tile config fields to replace (``None``: keep)."""
    import jax
    from jax._src.pallas.triton import pallas_call_registration as registration
    from jax.experimental.pallas import triton as pltriton
    from jax.export import DisabledSafetyCheck
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    from jaxinfer.backends.pallas.merge import force_triton_lowering

    captured = []
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, *args, **kwargs):
        result = lower(jaxpr, *args, **kwargs)
        captured.append((jaxpr.debug_info.func_name, result.module.operation.get_asm(enable_debug_info=False)))
        return result

    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice("NVIDIA H100", 1, "cuda"))
    os.makedirs(out, exist_ok=True)
    meta = {}
    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        for case in cases:
            run, args, cfg, kernel, key_bytes = (_mla_case if case == "mla" else _decode_case)(case, overrides)
            captured.clear()
            with force_triton_lowering(), jax.sharding.use_abstract_mesh(mesh):
                jax.export.export(jax.jit(run), platforms=["cuda"], disabled_checks=[
                    DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)])(*args)
            name, text = next((n, t) for n, t in captured if kernel in n)
            with open(os.path.join(out, f"{case}.ttir"), "w") as f:
                f.write(text)
            meta[case] = dict(kernel=name, kv_bytes_per_key=key_bytes, **dataclasses.asdict(cfg))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def _overridden(cfg, overrides: dict):
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _decode_case(case: str, overrides: dict):
    """``(run, abstract args, tile config, kernel name part, KV bytes a key)`` of the decode kernel
    at :data:`GEOMETRY` with a ``CASES[case]`` cache (K and V: ``2 D`` values a key)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxinfer
    from jaxinfer.backends.pallas.attention import attention

    g = GEOMETRY
    hq, hkv, d, ps, batch = g["num_qo_heads"], g["num_kv_heads"], g["head_dim"], g["page_size"], g["batch"]
    pages = g["kv_len"] // ps
    indptr = np.arange(batch + 1, dtype=np.int32) * pages
    indices = np.random.default_rng(0).permutation(batch * pages).astype(np.int32)
    last = np.full(batch, ps, np.int32)
    kv_dtype = jnp.dtype(CASES[case])
    plan = jaxinfer.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD", backend="pallas").plan(
        indptr, indices, last, hq, hkv, d, ps, q_data_type=jnp.bfloat16, kv_data_type=kv_dtype)
    scales = kv_dtype.itemsize == 1
    ks = dataclasses.replace(plan.inner.kernel, kv_layout="NHD", kv_scales=scales)
    cfg = _overridden(plan.inner.config, overrides)
    spec = jax.ShapeDtypeStruct
    kv = spec((batch * pages, ps, hkv, d), kv_dtype)
    args = [spec((ks.buffer_size,), jnp.int32), spec((batch, hq, d), jnp.bfloat16), kv, kv]
    args += [spec((2 * hkv,), jnp.float32)] if scales else []

    def run(buf, q, k, v, *scale):
        return attention(buf, q, k, v, None, *scale, ks=ks, cfg=cfg)

    return run, args, cfg, "attention", 2 * d * kv_dtype.itemsize


def _mla_case(case: str, overrides: dict):
    """The same for the MLA decode kernel at :data:`MLA_GEOMETRY` (bf16; ``Dc + Dp`` values a key,
    the ``ckv`` row read once as key and value)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxinfer
    from jaxinfer.backends.pallas import mla
    from jaxinfer.backends.pallas.backend import PallasBackend
    from jaxinfer.bench.mla import SM_SCALE

    g = MLA_GEOMETRY
    h, dc, dp, ps, batch = g["num_heads"], g["head_dim_ckv"], g["head_dim_kpe"], g["page_size"], g["batch"]
    pages = g["kv_len"] // ps
    indptr = np.arange(batch + 1, dtype=np.int32) * pages
    indices = np.random.default_rng(0).permutation(batch * pages).astype(np.int32)
    lens = np.full(batch, g["kv_len"], np.int32)
    cfg = _overridden(mla.DEFAULT_CONFIG, overrides)
    wrapper = jaxinfer.BatchMLAPagedAttentionWrapper(backend="pallas", pallas=PallasBackend(config=cfg))
    plan = wrapper.plan(np.arange(batch + 1, dtype=np.int32), indptr, indices, lens, h, dc, dp, ps, False, SM_SCALE,
                        jnp.bfloat16, jnp.bfloat16)
    ks = plan.inner.kernel
    spec = jax.ShapeDtypeStruct
    args = [spec((ks.buffer_size,), jnp.int32), spec((batch, h, dc), jnp.bfloat16), spec((batch, h, dp), jnp.bfloat16),
            spec((batch * pages, ps, dc), jnp.bfloat16), spec((batch * pages, ps, dp), jnp.bfloat16)]

    def run(buf, q_nope, q_pe, ckv, kpe):
        return mla.mla_attention(buf, q_nope, q_pe, ckv, kpe, ks=ks, cfg=cfg)

    return run, args, cfg, "mla", 2 * (dc + dp)


def compile_ttir(out: str) -> None:
    """Compile every case of ``meta.json`` (needs ``triton``; run by the ``--triton-python``
    interpreter) and write ``compile.json`` (registers, spill bytes)."""
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    result = {}
    for case, m in json.load(open(os.path.join(out, "meta.json"))).items():
        options = dict(num_warps=m["num_warps"], num_stages=m["num_stages"])
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        module = ir.parse_mlir_module(os.path.join(out, f"{case}.ttir"), context)
        module.context = context
        module = backend.make_ttir(module, {}, backend.parse_options(options), target.arch)
        canonical = os.path.join(out, f"{case}.canon.ttir")
        with open(canonical, "w") as f:
            f.write(str(module))
        kernel = triton.compile(canonical, target=target, options=options)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(out, f"{case}.{ext}"), "w") as f:
                f.write(kernel.asm[ext])
        cubin = os.path.join(out, f"{case}.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True, text=True)
        with open(os.path.join(out, f"{case}.sass"), "w") as f:
            f.write(sass.stdout)
        ptxas = subprocess.run([os.path.join(tools, "ptxas"), "-v", "-arch=sm_90a", os.path.join(out, f"{case}.ptx"),
                                "-o", os.devnull], capture_output=True, text=True).stderr
        spill = re.search(r"(\d+) bytes spill stores", ptxas)
        result[case] = dict(registers=int(re.search(r"Used (\d+) registers", ptxas).group(1)),
                            spill_store_bytes=int(spill.group(1)) if spill else 0)
    with open(os.path.join(out, "compile.json"), "w") as f:
        json.dump(result, f, indent=1)


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """``(address, opcode, instruction)`` of each SASS line of ``cuobjdump -sass`` output (the
    predicate stripped from the opcode)."""
    lines = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            body = re.sub(r"^@!?U?P[T0-9]+\s+", "", m.group(2).strip())
            lines.append((int(m.group(1), 16), body.split()[0] if body else "", m.group(2).strip()))
    return lines


def inner_loops(sass: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """``(first, last)`` addresses of the backward branches' loops but the outermost (the tile
    loop) and the kernel's closing branch to itself, in address order."""
    spans = set()
    for address, op, text in sass:
        m = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1]) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < address:
            spans.add((int(m.group(1), 16), address))
    if not spans:
        return []
    outer = max(hi - lo for lo, hi in spans)
    return sorted(s for s in spans if s[1] - s[0] < outer)


def classify(sass: list[tuple[int, str, str]], first: int, last: int) -> collections.Counter:
    """Instructions in ``[first, last]`` by :data:`CLASSES`."""
    counts = collections.Counter()
    for address, op, _ in sass:
        if first <= address <= last:
            counts[next(name for name, pattern in CLASSES if re.match(pattern, op))] += 1
    return counts


def report(out: str) -> str:
    """Each case's registers, spills and key-step loops: instructions a thread, warp instructions
    per key (x warps / block_n) and per KV byte (/ 2 D itemsize)."""
    meta = json.load(open(os.path.join(out, "meta.json")))
    built = json.load(open(os.path.join(out, "compile.json")))
    lines = []
    for case, m in meta.items():
        sass = parse_sass(open(os.path.join(out, f"{case}.sass")).read())
        lines.append(f"{case}: {built[case]['registers']} registers, {built[case]['spill_store_bytes']} B spilled, "
                     f"{len(sass)} instructions; {m['block_m']}x{m['block_n']}, {m['num_warps']} warps, "
                     f"{m['num_stages']} stages")
        for first, last in inner_loops(sass):
            counts = classify(sass, first, last)
            n = sum(counts.values())
            per_key = n * m["num_warps"] / m["block_n"]
            per_byte = per_key / m["kv_bytes_per_key"]
            lines.append(f"  loop {first:#x}-{last:#x}: {n} a thread, {per_key:.1f} warp instructions a key, "
                         f"{per_byte:.3f} a KV byte; {dict(counts.most_common())}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.bench.sass", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", nargs="?", choices=("all", "dump", "compile", "report"), default="all")
    p.add_argument("--out", default="build/sass", help="directory of the IR, SASS and counts")
    p.add_argument("--cases", default="bf16,e4m3", help=f"decode KV dtypes or mla, from {','.join(CASES)}")
    p.add_argument("--triton-python", default=os.environ.get("TRITON_PYTHON"),
                   help="an interpreter with triton==3.6.0 for the compile stage (or $TRITON_PYTHON)")
    p.add_argument("--block-n", type=int)
    p.add_argument("--warps", type=int)
    p.add_argument("--stages", type=int)
    args = p.parse_args(argv)
    if args.stage == "all" and not args.triton_python:
        p.error("the compile stage needs --triton-python (an interpreter with triton==3.6.0)")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the dump lowers for an abstract H100
    if args.stage in ("all", "dump"):
        dump(args.out, args.cases.split(","), dict(block_n=args.block_n, num_warps=args.warps,
                                                   num_stages=args.stages))
    if args.stage == "compile":
        compile_ttir(args.out)
    elif args.stage == "all":
        subprocess.run([args.triton_python, os.path.abspath(__file__), "compile", "--out", args.out], check=True)
    if args.stage in ("all", "report"):
        print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
