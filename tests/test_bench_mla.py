"""``python -m jaxinfer.bench.mla`` at CPU scale: every implementation agrees with the xla path."""

from __future__ import annotations

import json

import pytest

from jaxinfer.backends.pallas.config import TileConfig
from jaxinfer.bench import mla


def test_bench_mla_tiny(tmp_path, capsys):
    out = tmp_path / "mla.json"
    rows = mla.main(["--size", "tiny", "--repeats", "1", "--configs", "16x16x4x1", "--out", str(out)])
    assert [r["impl"] for r in rows] == ["pallas 16x16x4x1", "xla"] * len(mla.cases("tiny"))
    for r in rows:
        assert r["status"] == "ok", r
        assert r["rel_error"] <= mla.TOLERANCE and r["tb_per_s"] > 0
    assert json.loads(out.read_text())["rows"] == rows
    assert "TB/s" in capsys.readouterr().out


def test_bench_mla_cases_and_configs():
    full = {c.name: c for c in mla.cases("full")}
    assert full["b128_kv4096_p64"].kv_lens == (4096,) * 128 and full["b128_kv4096_p1"].page_size == 1
    assert (full["b128_zipf_p64"].num_heads, full["b128_zipf_p64"].head_dim_ckv) == (128, 512)
    # 128 x 4096 latent rows of 576 bf16 values, plus q (576) and o (512) per head.
    assert mla.bytes_moved(full["b128_kv4096_p64"]) == 2 * (128 * 4096 * 576 + 128 * 128 * 576 + 128 * 128 * 512)
    assert mla.parse_config("64x32x8x2") == TileConfig(64, 32, 8, 2, ctas_per_sm=1)
    with pytest.raises(ValueError, match="block_m x block_n"):
        mla.parse_config("64x32")
