"""benchmarks/runtime/bench_e2e.py's added rows and phases on the CPU (--smoke): FP8 KV, QuaRot-style,
fused-prologue and Hugging Face generate rows; long-context and per-component phases; the kernel
classifier of the components phase."""
from __future__ import annotations

import json

import pytest


def test_smoke_new_rows_and_phases(load_script, tmp_path):
    from flatquant.report import e2e

    out = tmp_path / "e2e.json"
    rows = "fp8_kv8,quarot,flatquant_fused,hf_bf16"
    assert load_script("bench_e2e").main(["--smoke", "--out", str(out), "--rows", rows, "--decode-batches", "2",
                                          "--phases", "decode,prefill,components,prefill_long,decode_long"]) == 0
    recs = json.loads(out.read_text())
    assert not [r for r in recs if r.get("error") or r.get("oom")]
    got = {(r["row"], r["phase"]) for r in recs}
    for row in ("fp8_kv8", "quarot", "flatquant_fused"):
        assert {(row, p) for p in ("decode", "prefill", "components", "prefill_long", "decode_long")} <= got
    assert {("hf_bf16", "prefill"), ("hf_bf16", "decode")} <= got
    assert all(r["reference_only"] for r in recs if r["row"] == "hf_bf16")
    comp = [r for r in recs if r["phase"] == "components"]
    assert {r["of_phase"] for r in comp} == {"decode", "prefill"}
    for r in comp:
        assert set(r["component_ms"]) == {"norm_transform_quant", "gemm", "attention", "other"}
        assert r["component_ms"]["gemm"] > 0 and r["kernel_ms_total"] > 0
    long = {(r["phase"], r["batch"], r["seqlen"], r["kv_len"]) for r in recs if r["row"] == "quarot"}
    assert ("prefill_long", 1, 24, 0) in long and ("decode_long", 2, 1, 24) in long
    per_tok = {r["row"]: r["kv_bytes_per_token"] for r in recs if r["phase"] == "decode" and r["row"] != "hf_bf16"}
    # tiny head_dim 16: fp8 one byte per element; KV4 8 code bytes + 8 scale / zero bytes per head and token
    assert per_tok["fp8_kv8"] == per_tok["quarot"] == per_tok["flatquant_fused"]
    text = "\n".join(e2e.e2e_section(recs))
    assert "FP8 W8A8 + FP8 KV" in text and "QuaRot" in text and "Time per component" in text


@pytest.mark.parametrize("name,comp", [
    ("_prologue_quant_kernel", "norm_transform_quant"), ("_fused_split_kernel", "norm_transform_quant"),
    ("_add_rmsnorm_kernel", "norm_transform_quant"), ("_quant_kernel", "norm_transform_quant"),
    ("_split_kernel", "attention"), ("_quantize_kv_kernel", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<...>", "attention"), ("_decode_kernel", "gemm"),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn", "gemm"), ("_w4a4_gemm_kernel", "gemm"),
    ("void at::native::elementwise_kernel<...>", "other")])
def test_classify_kernel_names(load_script, name, comp):
    assert load_script("bench_e2e").classify_kernel(name) == comp
