"""Record names and fields of the other settings: defaults (and older records) keep their old names."""
from __future__ import annotations

from flatquant.results import bits_tag, record_name, settings_tags

BASE = {"kind": "ppl", "model": "M", "method": "rtn", "w_bits": 4, "a_bits": 4, "kv_bits": 4, "dataset": "wikitext2"}


def test_default_and_old_records_keep_their_names():
    old = dict(BASE)
    new = {**BASE, "k_bits": 4, "v_bits": 4, "w_group_size": None, "w_asym": False, "kv_group_size": None,
           "mixed": None, "trained_bits": None}
    assert record_name(old) == record_name(new) == "ppl_M_rtn_W4A4KV4_wikitext2.json".replace("_", "-")
    assert settings_tags(old) == [] and bits_tag(old) == "W4A4KV4"
    assert settings_tags({**new, "trained_bits": "W4A4KV4"}) == []  # reused at its own bits


def test_each_setting_changes_the_name():
    names = {record_name(BASE)}
    for extra in ({"k_bits": 2, "v_bits": 4}, {"w_group_size": 128}, {"w_asym": True}, {"kv_group_size": 32},
                  {"mixed": "down_proj=w8a8"}, {"mixed": "down_proj=w8"}, {"trained_bits": "W4A16KV16"}):
        name = record_name({**BASE, **extra})
        assert name not in names, extra
        names.add(name)
    assert "K2V4" in record_name({**BASE, "k_bits": 2, "v_bits": 4})
    assert "trained-W4A16KV16" in record_name({**BASE, "trained_bits": "W4A16KV16"})
