"""The bench's dtype section (cluster/bench/dtype.py): the bfloat16/float32 A/B and the llama.cpp row."""
from __future__ import annotations

from cluster.bench.dtype import llama_cpp_row, markdown, measure_dtypes


def test_dtype_ab_and_llama_row(tiny_pair):
    from actors.model.loader import cpu_has_fast_bf16

    dt = measure_dtypes(str(tiny_pair / "target"), list(range(40)), 3, 64)
    by = dt["by_dtype"]
    assert set(by) == ({"float32", "bfloat16"} if cpu_has_fast_bf16() else {"float32"})
    for r in by.values():
        assert r["t_decode_1_s"] > 0 and r["t_verify_s"] > 0 and r["floor_s"] > 0
    if "bfloat16" in by:   # half the bytes streamed
        assert by["bfloat16"]["streamed_bytes"] * 2 == by["float32"]["streamed_bytes"]
    try:
        import llama_cpp  # noqa: F401
        installed = True
    except ImportError:
        installed = False
    row = llama_cpp_row(None, [1, 2, 3], 4)
    assert row["measured"] is False and (installed or "not installed" in row["why"])
    text = "\n".join(markdown(dt, row, "bfloat16"))
    assert "| float32 |" in text and "llama.cpp: not measured" in text and "**bfloat16**" in text
