"""The offline SASS tool (jaxinfer/bench/sass.py): the dump stage captures the decode and MLA
kernels' Triton modules on this CPU, and the SASS counting finds the key-step loops of a listing."""

from __future__ import annotations

import json

from jaxinfer.bench import sass

# A cuobjdump-like listing: a tile loop (0x0010-0x0090) around a key-step loop (0x0020-0x0060),
# and the kernel's closing branch to itself.
LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   LDSM.16.M88.4 R8, [R3] ;
        /*0030*/                   HMMA.16816.F32 R12, R8, R10, R12 ;
        /*0040*/              @!P0 F2FP.F16.E4M3.UNPACK_B R6, R7 ;
        /*0050*/                   IMAD.MOV.U32 R5, RZ, RZ, R6 ;
        /*0060*/               @P1 BRA 0x20 ;
        /*0070*/                   STL [R1], R5 ;
        /*0080*/                   ISETP.GE.AND P2, PT, R2, 0x4, PT ;
        /*0090*/               @P2 BRA 0x10 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""


def test_sass_counting_finds_the_key_step_loop_and_classes():
    listing = sass.parse_sass(LISTING)
    assert [op for _, op, _ in listing][:4] == ["MOV", "LDG.E", "LDSM.16.M88.4", "HMMA.16816.F32"]
    assert listing[4][1] == "F2FP.F16.E4M3.UNPACK_B"  # the predicate is not the opcode
    assert sass.inner_loops(listing) == [(0x20, 0x60)]
    counts = sass.classify(listing, 0x20, 0x60)
    assert counts == {"LDSM": 1, "HMMA": 1, "F2FP": 1, "IMAD.MOV": 1, "control": 1}


def test_dump_writes_the_decode_kernels_triton_module(tmp_path):
    sass.dump(str(tmp_path), ["bf16", "e4m3"], {"block_n": None, "num_warps": None, "num_stages": None})
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["bf16"]["kv_bytes_per_key"] == 2 * 128 * 2 and meta["e4m3"]["kv_bytes_per_key"] == 2 * 128
    assert meta["e4m3"]["block_n"] == 2 * meta["bf16"]["block_n"]  # the heuristic's fp8 tiles
    for case in ("bf16", "e4m3"):
        text = (tmp_path / f"{case}.ttir").read_text()
        assert "tt.func" in text and "tt.dot" in text
    fp8 = (tmp_path / "e4m3.ttir").read_text()
    assert "cvt.rn.f16x2.e4m3x2" in fp8 and "cvt.rn.f16x2" not in (tmp_path / "bf16.ttir").read_text()


def test_dump_writes_the_mla_kernels_triton_module(tmp_path):
    sass.dump(str(tmp_path), ["mla"], {"block_n": 32, "num_warps": None, "num_stages": None})
    meta = json.loads((tmp_path / "meta.json").read_text())["mla"]
    assert "mla" in meta["kernel"] and meta["kv_bytes_per_key"] == 2 * (512 + 64)
    assert meta["block_n"] == 32 and meta["block_m"] == 64  # the override, the default's rows
    text = (tmp_path / "mla.ttir").read_text()
    assert text.count("tt.dot") == 6  # q_nope.ckv, q_pe.kpe, P.ckv in the mask-free and the masked loop
