"""`flatquant eval/quantize` with the other settings: groups, K/V bits, KV groups, --mixed, the accuracy
knobs; their record fields; bad values as one-line errors (exit status 2)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flatquant import cli


def _load(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_fq_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_cli_tests = _load("test_cli")
run, assert_user_error, records, common = (_cli_tests.run, _cli_tests.assert_user_error, _cli_tests.records,
                                           _cli_tests.common)
NEW_FIELDS = ("k_bits", "v_bits", "w_group_size", "w_asym", "kv_group_size", "mixed", "trained_bits")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import gzip

    h = _cli_tests._helpers
    root = tmp_path_factory.mktemp("cli-settings")
    tok = h.build_tokenizer()
    model_dir = root / "tiny-llama"
    h.build_model("llama", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "data"
    for sub in ("wikitext2", "c4", "calib"):
        (data / sub).mkdir(parents=True)
    (data / "wikitext2" / "wikitext2_raw_test.txt").write_text("\n\n".join([h.SAMPLE_TEXT] * 3))
    (data / "calib" / "wiki_articles.txt").write_text("\n\n".join([h.SAMPLE_TEXT] * 4))
    with gzip.open(data / "c4" / "c4_validation_proxy.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": h.SAMPLE_TEXT}) + "\n")
    return {"root": root, "model": model_dir, "data": data}


def _eval(env, results, *extra):
    return ["eval", "--model", env["model"], *common(env["data"], results), *extra]


def test_settings_reach_the_record(env, tmp_path, capsys):
    results = tmp_path / "r"
    rc, out, err = run(_eval(env, results, "--method", "rtn", "--w-bits", "3", "--a-bits", "16",
                             "--k-bits", "2", "--v-bits", "3", "--w-group-size", "16", "--w-asym",
                             "--kv-group-size", "8", "--mixed", "down_proj=w8;layers=1:kv4",
                             "--weight-quantizer", "gptq", "--no-gptq-act-order"), capsys)
    assert rc == 0, err
    (rec,) = records(results)
    assert (rec["k_bits"], rec["v_bits"], rec["kv_bits"]) == (2, 3, 4)
    assert (rec["w_group_size"], rec["w_asym"], rec["kv_group_size"]) == (16, True, 8)
    assert rec["mixed"] == "down_proj=w8;layers=1:kv4" and rec["trained_bits"] is None
    assert rec["gptq"]["act_order"] is False
    name = next(results.glob("*.json")).name
    assert name.startswith("ppl-tiny-llama-rtn-W3A16K2V3-g16-wasym-kvg8-mixed-") and "-gptq-" in name
    assert "W3A16K2V3" in out


def test_default_record_has_the_default_fields(env, tmp_path, capsys):
    results = tmp_path / "r"
    rc, _, err = run(_eval(env, results, "--method", "rtn"), capsys)
    assert rc == 0, err
    (rec,) = records(results)
    assert {k: rec[k] for k in NEW_FIELDS} == {"k_bits": 4, "v_bits": 4, "w_group_size": None, "w_asym": False,
                                               "kv_group_size": None, "mixed": None, "trained_bits": None}
    assert next(results.glob("*.json")).name == "ppl-tiny-llama-rtn-W4A4KV4-wikitext2-maxwin2.json"


def test_mixed_json_file(env, tmp_path, capsys):
    spec = tmp_path / "mixed.json"
    spec.write_text(json.dumps([{"layers": [0], "w": 8, "a": 8}]))
    results = tmp_path / "r"
    rc, _, err = run(_eval(env, results, "--method", "rtn", "--mixed", spec), capsys)
    assert rc == 0, err
    assert records(results)[0]["mixed"] == "layers=0:w8a8"


@pytest.mark.parametrize("extra,words", [
    (["--mixed", "k_proj=a8"], ["share one input quantizer"]),
    (["--mixed", "up_proj=8"], ["share one input quantizer"]),
    (["--mixed", "layers=7:w8"], ["layer 7 does not exist"]),
    (["--mixed", "nope_proj=w8"], ["nope_proj"]),
    (["--mixed", "w8;"], ["empty clause"]),
    (["--mixed", "missing.json"], ["no such file"]),
    (["--kv-group-size", "5"], ["head dimension"]),
    (["--w-group-size", "5"], ["does not divide"]),
    (["--w-group-size", "0"], ["positive integer"]),
    (["--k-bits", "1"], ["between 2 and 16"]),
    (["--scale-alpha", "2"], ["scale_alpha"]),
    (["--weight-decay", "-1"], ["weight_decay"]),
])
def test_bad_settings_are_one_line_errors(env, tmp_path, capsys, extra, words):
    results = tmp_path / "r"
    rc, _, err = run(_eval(env, results, "--method", "rtn", *extra), capsys)
    assert_user_error(rc, err, *words)
    assert not results.exists() or not list(results.glob("*.json"))


def test_help_shows_each_default():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in ("eval", "quantize"):
        helps = {o: a.help for a in sub.choices[command]._actions for o in a.option_strings}
        for opt in ("--w-group-size", "--w-asym", "--k-bits", "--v-bits", "--kv-group-size", "--mixed",
                    "--gptq-act-order", "--scale-alpha", "--kv-clip-split", "--calib-loss", "--weight-decay"):
            assert "default" in helps[opt], (command, opt)


def test_w4a16_params_evaluated_at_w4a4kv4(env, tmp_path, capsys):
    params, results = tmp_path / "p", tmp_path / "r"
    rc, _, err = run(["quantize", "--model", env["model"], "--preset", "tiny", "--output", params,
                      "--w-bits", "4", "--a-bits", "16", "--kv-bits", "16", "--compare", "",
                      "--scale-alpha", "0.3", "--kv-clip-split", "--calib-loss", "nmse-token",
                      *common(env["data"], tmp_path / "rq")], capsys)
    assert rc == 0, err
    meta = json.loads((params / "flatquant.json").read_text())
    assert (meta["calib"]["scale_alpha"], meta["calib"]["kv_clip_split"], meta["calib"]["loss"]) == \
        (0.3, True, "nmse-token")
    (q,) = records(tmp_path / "rq")
    assert q["trained_bits"] is None and q["calib"]["scale_alpha"] == 0.3
    rc, _, err = run(_eval(env, results, "--method", "flatquant", "--params", params), capsys)
    assert rc == 0, err
    (rec,) = records(results)
    assert rec["trained_bits"] == "W4A16KV16" and (rec["a_bits"], rec["kv_bits"]) == (4, 4)
    assert "trained-W4A16KV16" in next(results.glob("*.json")).name
