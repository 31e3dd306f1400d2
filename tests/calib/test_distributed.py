"""Multi-process calibration on the CPU (gloo): 2 processes save the same bytes as 1; a rank's failure stops
every rank with one message and leaves the finished layers resumable, with another number of processes."""
from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from flatquant.calib.distributed import assign
from tests.calib._dist_worker import run_rank
from tests.conftest import build_model


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "model"
    build_model("llama", vocab_size=len(tiny_tokenizer), num_hidden_layers=3).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _windows(n_vocab: int) -> torch.Tensor:
    return torch.randint(0, n_vocab, (4, 32), generator=torch.Generator().manual_seed(0))


def _run(world, model_dir, out, windows, tmp_path, fail_layer=None, gptq=False) -> list[str]:
    res = tmp_path / f"res-{world}-{fail_layer}"
    res.mkdir(exist_ok=True)
    if world == 1:
        import os

        os.environ.pop("WORLD_SIZE", None)
        from flatquant.calib.offload import ShardedSource
        from flatquant.calib.streaming import calibrate_streaming
        from flatquant.config import CalibConfig, method_config

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cc = CalibConfig(nsamples=4, seqlen=32, epochs=2, batch_size=2)
            qcfg = method_config("flatquant", calib=cc, **({"weight_quantizer": "gptq"} if gptq else {}))
            calibrate_streaming(ShardedSource(model_dir, "cpu", torch.float32), qcfg, windows, cc, out, mode="disk",
                                log=lambda _m: None)
        finally:
            torch.set_num_threads(threads)
        return ["ok"]
    mp.spawn(run_rank, args=(world, _port(), str(model_dir), str(out), windows, fail_layer, str(res), gptq),
             nprocs=world)
    return [(res / f"rank{r}.txt").read_text() for r in range(world)]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "layers").glob("*.safetensors"))}


def test_assign_depends_only_on_layers_left():
    assert assign([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    assert assign([3, 4], 3) == [[3, 4]]


def test_two_processes_save_the_same_bytes_as_one(model_dir, tmp_path, tiny_tokenizer):
    windows = _windows(len(tiny_tokenizer))
    assert _run(1, model_dir, tmp_path / "one", windows, tmp_path) == ["ok"]
    assert _run(2, model_dir, tmp_path / "two", windows, tmp_path) == ["ok", "ok"]
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 3 and one == two
    m1, m2 = (json.loads((tmp_path / d / "flatquant.json").read_text()) for d in ("one", "two"))
    assert m1["complete"] and m2["complete"] and m1["checksums"] == m2["checksums"]
    assert [r["layer"] for r in m2["report"]] == [0, 1, 2]
    assert not (tmp_path / "two" / "_activations").exists()


def test_gptq_sharded_over_two_processes_saves_the_same_bytes_as_one(model_dir, tmp_path, tiny_tokenizer):
    """GPTQ's per-group solves split over 2 ranks (methods.gptq_shard): the same codes and files as 1 rank."""
    windows = _windows(len(tiny_tokenizer))
    assert _run(1, model_dir, tmp_path / "one", windows, tmp_path, gptq=True) == ["ok"]
    assert _run(2, model_dir, tmp_path / "two", windows, tmp_path, gptq=True) == ["ok", "ok"]
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 3 and one == two
    m1, m2 = (json.loads((tmp_path / d / "flatquant.json").read_text()) for d in ("one", "two"))
    assert m1["gptq"] and m1["checksums"] == m2["checksums"]
    errs = [[(r["gptq_rtn_err"], r["gptq_err"]) for r in m["report"]] for m in (m1, m2)]
    assert errs[0] == errs[1] and all(g < r for r, g in errs[0])


def test_shard_groups_balances_and_covers_every_group():
    from flatquant.config import CalibConfig, method_config
    from flatquant.core.modules import quantize_layer
    from flatquant.methods.flatquant import layer_transforms
    from flatquant.methods.gptq_shard import shard_groups
    from flatquant.models.families import family_for

    model = build_model("llama", num_hidden_layers=1, intermediate_size=256)
    family = family_for(model)
    layer = family.decoder_layers(model)[0]
    cc = CalibConfig()
    quantize_layer(layer, family, method_config("flatquant", calib=cc),
                   layer_transforms(model.config, cc, torch.Generator().manual_seed(0), layer=layer))
    groups = set(family.gptq_groups(layer))
    shares = shard_groups(layer, family, 2)
    assert shares[0] | shares[1] == groups and not shares[0] & shares[1]
    assert shard_groups(layer, family, 1) == [groups]
    down = [k for k, (_m, roles) in family.gptq_groups(layer).items() if "down_proj" in roles]
    assert down and {down[0]} in shares  # the largest solve (the MLP's down projection) has a rank to itself


def test_rank_failure_stops_all_and_resumes_with_other_world(model_dir, tmp_path, tiny_tokenizer):
    windows = _windows(len(tiny_tokenizer))
    out = tmp_path / "run"
    msgs = _run(2, model_dir, out, windows, tmp_path, fail_layer=1)
    assert all(m.startswith("RankFailed: rank 1 failed on layer 1: RuntimeError: simulated failure") for m in msgs)
    meta = json.loads((out / "flatquant.json").read_text())
    assert meta["layers_done"] == [0] and not meta["complete"]
    assert _run(1, model_dir, out, windows, tmp_path) == ["ok"]  # resumed by one process
    _run(1, model_dir, tmp_path / "ref", windows, tmp_path)
    assert _files(out) == _files(tmp_path / "ref")


def test_torchrun_cli_matches_one_process(model_dir, tmp_path, tiny_data_dir):
    """`torchrun --nproc-per-node 2 -m flatquant quantize --offload disk` (gloo) saves what one process does."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    args = ["-m", "flatquant", "quantize", "--model", str(model_dir), "--offload", "disk", "--device", "cpu",
            "--preset", "cpu-quick", "--calib-samples", "4", "--calib-seqlen", "32", "--epochs", "1",
            "--data-dir", str(tiny_data_dir), "--no-progress"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *args, "--output", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout and "ETA" in two.stdout
    one = subprocess.run([sys.executable, *args, "--output", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert _files(tmp_path / "one") == _files(tmp_path / "two") and len(_files(tmp_path / "one")) == 3
    assert not (tmp_path / "two.partial").exists()
