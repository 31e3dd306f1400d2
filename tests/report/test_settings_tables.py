"""The paper's Tables 11-15 layouts (flatquant.report.settings_tables) from synthetic records."""
from __future__ import annotations

from flatquant.report import document
from flatquant.report.settings_tables import (
    kv_section,
    low_bit_section,
    settings_sections,
    train_once_section,
    weight_only_section,
)

PROV = {"device": "NVIDIA H100 80GB HBM3", "git_commit": "0123456789abcdef0123456789abcdef01234567",
        "command": "flatquant eval", "date": "2026-01-01T00:00:00+00:00", "model": "M", "seqlen": 2048}
WINDOWS = {"wikitext2": 140, "c4": 256}


def ppl(method, w, a, kv, value, dataset="wikitext2", **extra):
    return {**PROV, "kind": "ppl", "method": method, "w_bits": w, "a_bits": a, "kv_bits": kv, "dataset": dataset,
            "ppl": value, "windows": WINDOWS[dataset], "weight_quantizer": "rtn", **extra}


def zs(method, w, a, kv, avg, limit=None, **extra):
    r = {k: v for k, v in PROV.items() if k != "seqlen"}
    return {**r, "kind": "zeroshot", "method": method, "w_bits": w, "a_bits": a, "kv_bits": kv, "limit": limit,
            "weight_quantizer": "rtn", "tasks": {"arc_easy": {"value": avg + 1, "n": 10}, "piqa": {"value": avg - 1}},
            "average": avg, **extra}


def _row(md: str, start: str) -> str:
    rows = [line for line in md.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, rows)
    return rows[0]


def test_weight_only_table_rows_columns_and_missing_cells():
    recs = [ppl("fp16", 16, 16, 16, 17.31), ppl("fp16", 16, 16, 16, 22.05, "c4"),
            ppl("rtn", 4, 16, 16, 19.21), ppl("rtn", 3, 16, 16, 2.2e3), ppl("rtn", 4, 16, 16, 25.5, "c4"),
            ppl("rtn", 4, 16, 16, 18.02, weight_quantizer="gptq"),
            ppl("rtn", 3, 16, 16, 21.5, weight_quantizer="gptq", w_group_size=128, w_asym=True),
            ppl("quarot", 4, 16, 16, 18.4), ppl("flatquant", 4, 16, 16, 17.9),
            ppl("flatquant", 3, 16, 16, 19.7, weight_quantizer="gptq"),
            ppl("quarot", 4, 4, 4, 40.0)]  # not weight-only: left out
    md = "\n".join(weight_only_section(recs))
    assert "Table 11 layout" in md
    assert _row(md, "| Method |") == ("| Method | WikiText-2 W4A16 | WikiText-2 W3A16 | C4 (proxy) W4A16 | "
                                       "C4 (proxy) W3A16 |")
    assert _row(md, "| RTN |") == "| RTN | 19.21 | 2200.0 | 25.50 | - |"
    assert _row(md, "| GPTQ |") == "| GPTQ | 18.02 | - | - | - |"
    assert _row(md, "| GPTQ-g128 asym |") == "| GPTQ-g128 asym | - | 21.50 | - | - |"
    assert _row(md, "| FP16 |") == "| FP16 | 17.31 | 17.31 | 22.05 | 22.05 |"
    assert "| FlatQuant-RTN | 17.90 |" in md and "| FlatQuant-GPTQ | - | 19.70 |" in md
    lines = md.splitlines()
    order = [next(i for i, line in enumerate(lines) if line.startswith(f"| {lab} |"))
             for lab in ("FP16", "RTN", "GPTQ", "GPTQ-g128 asym", "QuaRot", "FlatQuant-RTN", "FlatQuant-GPTQ")]
    assert order == sorted(order)
    assert "40.00" not in md and "NVIDIA H100" in md and "0123456789" in md


def test_fewer_windows_and_other_devices_are_never_mixed_silently():
    recs = [ppl("rtn", 4, 16, 16, 19.21), ppl("quarot", 4, 16, 16, 18.4, windows=8, device="cpu")]
    md = "\n".join(weight_only_section(recs))
    assert "18.40 (n=8)" in md and "19.21 |" in md
    assert "NVIDIA H100 80GB HBM3, cpu" in md


def test_kv_only_tables_12_and_13_with_split_bits_and_zero_shot():
    recs = [ppl("fp16", 16, 16, 16, 17.31), zs("fp16", 16, 16, 16, 50.0)]
    for k, v, val in [(4, 4, 17.5), (4, 2, 19.0), (2, 4, 30.0), (3, 3, 18.1)]:
        recs.append(ppl("flatquant", 16, 16, 4, val, k_bits=k, v_bits=v, kv_group_size=128))
    recs.append(ppl("quarot", 16, 16, 4, 17.8, k_bits=4, v_bits=4, kv_group_size=128))
    recs.append(zs("flatquant", 16, 16, 4, 48.5, k_bits=4, v_bits=2, kv_group_size=128, limit=100))
    recs.append(ppl("quarot", 16, 16, 3, 18.9, windows=8))  # an old record: k = v = kv_bits; fewer windows
    md = "\n".join(kv_section(recs))
    assert "FlatQuant (Table 12 layout)" in md and "QuaRot (Table 12 layout)" in md
    fq = md.split("FlatQuant (Table 12 layout)")[1].split("###")[0]
    assert "| 16 | 16 | 17.31 | - | 51.00 | 49.00 | 50.00 (limit none) |" in fq
    assert "| 4 | 2 | 19.00 | - | 49.50 | 47.50 | 48.50 (limit 100) |" in fq
    assert "| 2 | 4 | 30.00 |" in fq and "| 2 | 2 |" not in fq  # no record: no row
    assert "groups of 128" in fq
    qr = md.split("QuaRot (Table 12 layout)")[1].split("###")[0]
    assert "| 3 | 3 | 18.90 (n=8) |" in qr and "| 4 | 4 | 17.80 |" in qr
    assert "| QuaRot | 3 | 3 | 18.90 (n=8) |" in md
    t13 = md.split("Table 13 layout")[1]
    assert "| Method | K bits | V bits | M |" in t13
    assert t13.index("| FP16 | 16 | 16 | 17.31 |") < t13.index("| QuaRot | 4 | 4 | 17.80 |") \
        < t13.index("| FlatQuant | 4 | 4 | 17.50 |") < t13.index("| FlatQuant | 2 | 4 | 30.00 |")
    assert t13.count("| 16 | 16 |") == 1


def test_split_kv_records_stay_out_of_table_1_and_do_not_collide():
    recs = [ppl("flatquant", 16, 16, 4, 17.5, k_bits=4, v_bits=4),
            ppl("flatquant", 16, 16, 4, 19.0, k_bits=4, v_bits=2)]
    md = document.render_markdown(recs)
    table1 = md.split("## Perplexity (Table 1 layout)")[1].split("\n## ")[0]
    assert "17.50" in table1 and "19.00" not in table1
    assert "| 4 | 2 | 19.00 |" in md and "| 4 | 4 | 17.50 |" in md


def test_low_bit_table_14_with_zero_shot():
    recs = [ppl("fp16", 16, 16, 16, 17.31), ppl("quarot", 4, 4, 4, 41.2), ppl("flatquant", 4, 4, 4, 28.7),
            ppl("quarot", 3, 3, 3, 686.5), ppl("flatquant", 3, 3, 3, 60.1), ppl("flatquant", 3, 3, 3, 70.2, "c4"),
            zs("flatquant", 3, 3, 3, 40.0), zs("fp16", 16, 16, 16, 50.0),
            ppl("flatquant", 3, 3, 3, 99.0, variant="ablation:+LT")]  # not the main run
    md = "\n".join(low_bit_section(recs))
    assert "Table 14 layout" in md
    assert _row(md, "| FlatQuant-W3A3KV3 |") == "| FlatQuant-W3A3KV3 | 60.10 | 70.20 | 41.00 | 39.00 | 40.00 |"
    assert _row(md, "| QuaRot-W3A3KV3 |") == "| QuaRot-W3A3KV3 | 686.5 | - | - | - | - |"
    lines = md.splitlines()
    order = [next(i for i, line in enumerate(lines) if line.startswith(f"| {lab} |")) for lab in
             ("FP16", "QuaRot-W4A4KV4", "FlatQuant-W4A4KV4", "QuaRot-W3A3KV3", "FlatQuant-W3A3KV3")]
    assert order == sorted(order) and "99.00" not in md
    assert low_bit_section([ppl("quarot", 4, 4, 4, 41.2)]) == []  # no 3-bit record: no table


def test_train_once_table_15():
    trained = {"trained_bits": "W4A4KV4"}
    recs = [ppl("fp16", 16, 16, 16, 17.31), zs("fp16", 16, 16, 16, 50.0),
            ppl("flatquant", 4, 16, 16, 18.2, **trained), ppl("flatquant", 16, 4, 16, 20.3, trained_bits=[4, 4, 4]),
            ppl("flatquant", 16, 16, 4, 17.6, trained_bits={"w_bits": 4, "a_bits": 4, "kv_bits": 4}),
            ppl("flatquant", 4, 4, 4, 28.7), zs("flatquant", 4, 16, 16, 49.1, **trained),
            ppl("flatquant", 4, 16, 16, 17.9)]  # trained at W4A16: Table 11, not 15
    md = "\n".join(train_once_section(recs))
    assert "Table 15 layout" in md
    assert _row(md, "| ✓ |  |  |") == "| ✓ |  |  | W4A16KV16 | 18.20 | - | 49.10 |"
    assert _row(md, "|  | ✓ |  |") == "|  | ✓ |  | W16A4KV16 | 20.30 | - | - |"
    assert _row(md, "|  |  | ✓ |") == "|  |  | ✓ | W16A16KV4 | 17.60 | - | - |"
    assert _row(md, "| ✓ | ✓ | ✓ |") == "| ✓ | ✓ | ✓ | W4A4KV4 | 28.70 | - | - |"
    assert _row(md, "|  |  |  |") == "|  |  |  | W16A16KV16 | 17.31 | - | 50.00 |"
    assert "17.90" not in md
    full = document.render_markdown(recs)
    table1 = full.split("## Perplexity (Table 1 layout)")[1].split("\n## ")[0]
    assert "18.20" not in table1 and "17.90" in table1  # evaluated at other bits than trained: not Table 1


def test_no_setting_records_no_sections():
    assert settings_sections([]) == []
    assert settings_sections([ppl("quarot", 4, 4, 4, 41.2)]) == []
