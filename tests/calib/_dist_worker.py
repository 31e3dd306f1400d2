"""Worker of the multi-process calibration test: one rank of a gloo job (run by torch.multiprocessing.spawn)."""
from __future__ import annotations

import os


def run_rank(rank: int, world: int, port: int, model_dir: str, out_dir: str, windows, fail_layer: int | None,
             result_dir: str, gptq: bool = False) -> None:
    import torch

    from flatquant.calib.distributed import setup, teardown
    from flatquant.calib.offload import ShardedSource
    from flatquant.calib.streaming import calibrate_streaming
    from flatquant.config import CalibConfig, method_config

    torch.set_num_threads(1)  # the same kernels in every process: byte-identical results
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist, device = setup("cpu")
    cc = CalibConfig(nsamples=4, seqlen=32, epochs=2, batch_size=2)
    source = ShardedSource(model_dir, device, torch.float32)
    if fail_layer is not None and rank == 1:  # a rank that breaks on one layer
        real = source.layer

        def broken(i):
            if i == fail_layer:
                raise RuntimeError("simulated failure")
            return real(i)
        source.layer = broken
    msg = "ok"
    try:
        qcfg = method_config("flatquant", calib=cc, **({"weight_quantizer": "gptq"} if gptq else {}))
        calibrate_streaming(source, qcfg, windows, cc, out_dir, mode="disk",
                            dist=dist, log=lambda _m: None)
    except Exception as e:  # the test reads each rank's outcome
        msg = f"{type(e).__name__}: {e}"
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
            f.write(msg)
        teardown(dist)
