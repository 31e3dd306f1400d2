"""FlatQuant calibration of a model streamed layer by layer, in one process or over torch.distributed ranks.

One process: each decoder layer in turn is read from its source, calibrated on its inputs (kept in CPU
memory or a disk memmap between layers), saved, and released; its full-precision outputs are the next
layer's inputs (the same loop as `methods.flatquant.calibrate`, with the same per-layer seeds, so the
saved files are the same).

Several processes: FlatQuant trains each block against the full-precision block's outputs, so once every
layer's full-precision inputs are known the layers are independent. Rank 0 runs one sequential
full-precision pass and writes each remaining layer's inputs to a memmap under the work folder; the layers
are then trained in rounds, layer todo[k*N + r] on rank r. Each rank writes its layer's file atomically
and rank 0 indexes it (checksum, losses) in flatquant.json, so a failure anywhere leaves every finished
layer resumable, with any number of processes. GPTQ (its inputs are the quantized layers' outputs) runs
after, sequentially on rank 0.
"""
from __future__ import annotations

import gc
import math
import shutil
import time
from pathlib import Path

import torch

from flatquant.calib import offload
from flatquant.calib.artifacts import LayerStore, load_layer_state, write_layer_file
from flatquant.calib.distributed import Dist, RankFailed, assign
from flatquant.calib.layerwise import capture_layer_inputs, layer_input_absmax
from flatquant.calib.train_step import run_layer
from flatquant.config import CalibConfig, QuantConfig
from flatquant.core.modules import cast_weights, freeze, install_attention_hook, quantize_layer, unfreeze
from flatquant.errors import FlatQuantError

ACT_DIR = "_activations"  # inside the work folder; removed when the calibration finishes


def _fmt(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Rank 0's summary line per layer: losses, seconds, and the ETA of the layers left."""

    def __init__(self, total: int, log, what: str = "layer"):
        self.total, self.log, self.what = total, log, what
        self.t0, self.n = time.time(), 0

    def done(self, row: dict, count: int = 1) -> None:
        self.n += count
        elapsed = time.time() - self.t0
        eta = elapsed / max(self.n, 1) * (self.total - self.n)
        extra = " (resumed)" if row.get("resumed") else ""
        rank = f" rank {row['rank']}" if "rank" in row else ""
        self.log(f"{self.what} {row['layer']:3d} [{self.n}/{self.total}]{rank}: mse {row['loss_before']:.4g} -> "
                 f"{row['loss_after']:.4g}, {row.get('seconds', 0.0):.1f} s{extra}; ETA {_fmt(eta)}")


def _message(e: BaseException) -> str:
    if isinstance(e, FlatQuantError):
        return str(e)
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def together(dist: Dist, what: str, fn):
    """Run fn on this rank; when any rank fails, every rank stops with one message (alone: fn's own error)."""
    if dist.world == 1:
        return fn()
    err, out = None, None
    try:
        out = fn()
    except Exception as e:  # reported to every rank below
        err = _message(e)
    dist.check(err, what)
    return out


def _epoch_seconds(row: dict, timings: dict) -> None:
    """Median seconds of one training epoch (what more epochs cost), when the layer was trained."""
    epochs = sorted(timings.get("epoch", []))
    if epochs:
        row["epoch_seconds"] = round(epochs[len(epochs) // 2], 3)


def _free() -> None:
    """Drop the finished layer's memory now (its CUDA graph and optimizer may sit in reference cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _layer_seed(seed: int, i: int) -> int:
    return seed * 100003 + i  # per layer, as methods.flatquant.calibrate: any split over ranks gives one result


def calibrate_streaming(source: offload.LayerSource, qcfg: QuantConfig, windows: torch.Tensor, cfg: CalibConfig,
                        out_dir: str | Path, mode: str = "cpu", seed: int = 0, resume: bool = True,
                        dist: Dist | None = None, log=print) -> dict:
    """Calibrate FlatQuant on `windows` with layers from `source`, saving every layer in `out_dir` (the
    params folder format of calib.artifacts). Returns {"calib_layers": rows, "gptq": ... (with GPTQ)}."""
    from flatquant.methods.flatquant import calibrate_layer

    dist = dist or Dist()
    out_dir = Path(out_dir)
    device, config, family = source.device, source.config, source.family
    act_dtype = source.dtype if device.type == "cuda" else torch.float32
    amp = cfg.recipe == "svd-amp" and device.type == "cuda"
    say = log if dist.main else (lambda _m: None)

    def open_store():
        store = LayerStore(out_dir, config, qcfg, cfg)
        if dist.main and not resume:
            store.clear()
        return store

    store = together(dist, "setup", open_store if dist.main else lambda: None)
    dist.barrier()
    if not dist.main:
        store = LayerStore(out_dir, config, qcfg, cfg)  # the state rank 0 left (cleared or resumed)
    done = set(store.meta["layers_done"]) if resume else set()
    model = source.skeleton()
    install_attention_hook(model)
    pin = device.type == "cuda"
    work = out_dir / ACT_DIR
    shape = (int(windows.shape[0]), int(windows.shape[1]), int(config.hidden_size))
    # the activation sets live in host memory (pinned) or a disk memmap; the device sees one mini-batch
    inps = offload.activations(mode if dist.world == 1 else "cpu", shape, act_dtype, work, "current", pin=pin)
    _, kwargs = capture_layer_inputs(model, family, windows, act_dtype, out=inps)
    source.unload()
    n_layers = source.num_layers
    progress = Progress(n_layers, say)
    rows: dict[int, dict] = {}
    if dist.world == 1:
        acts, nxt = inps, offload.activations(mode, shape, act_dtype, work, "next", pin=pin)
        del inps
        for i in range(n_layers):
            t = time.time()
            saved = store.load_layer(i) if i in done else None
            layer = source.layer(i)
            timings: dict = {}
            layer, _targets, row = calibrate_layer(layer, family, config, qcfg, cfg, acts, kwargs,
                                                   _layer_seed(seed, i), amp, saved=saved, log=say, index=i,
                                                   timings=timings, device=device, targets=nxt)
            row["seconds"] = round(time.time() - t, 2)
            _epoch_seconds(row, timings)
            if saved is None:
                store.record_layer(i, write_layer_file(out_dir, i, layer), row)
            acts, nxt = nxt, acts  # full-precision outputs (written into nxt): the next layer's inputs
            del layer, _targets
            source.release(i)
            _free()
            rows[i] = row
            progress.done(row)
        del acts, nxt
    else:
        held = [inps if dist.main else None]
        del inps  # only rank 0 keeps layer 0's inputs (for its full-precision pass)
        rows.update(_parallel(source, store, qcfg, cfg, held, kwargs, done, seed, amp, work, dist, progress, say))
    out = {"calib_layers": [rows[i] for i in sorted(rows)]}
    if qcfg.weight_quantizer == "gptq":
        g = together(dist, "GPTQ", lambda: gptq_streaming(source, store, qcfg, cfg, windows, act_dtype, say,
                                                          dist=dist, mode=mode, work=work))
        if dist.main:
            for row, r in zip(out["calib_layers"], g["layers"]):
                row["gptq_rtn_err"], row["gptq_err"] = r["rtn_err"], r["gptq_err"]
            out["gptq"] = {k: v for k, v in g.items() if k != "layers"}
    if dist.main:
        store.finish(out["calib_layers"], out.get("gptq"))
        offload.drop_activations(work)
    dist.barrier()
    return out


def _parallel(source, store, qcfg, cfg, held: list, kwargs, done, seed, amp, work, dist: Dist, progress,
              say) -> dict:
    """The full-precision pass on rank 0, then the remaining layers trained in rounds over the ranks.
    held: [layer 0's inputs] (popped, so that they are freed after the full-precision pass)."""
    from flatquant.methods.flatquant import calibrate_layer

    inps = held.pop()
    device, family, config = source.device, source.family, source.config
    n_layers = source.num_layers
    todo = [i for i in range(n_layers) if i not in done]
    rows = {}
    for i in sorted(done):  # losses recorded when those layers were trained
        rows[i] = {**store.meta.get("layer_rows", {}).get(str(i), {"layer": i}), "resumed": True}
    dtype = source.dtype if device.type == "cuda" else torch.float32
    shape = tuple(inps.shape) if inps is not None else None
    shape = dist.broadcast(shape)

    def fp_pass(x):
        t0 = time.time()
        need = len(todo) * x.numel() * x.element_size()
        work.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(work).free
        if need > free:
            raise FlatQuantError(f"the full-precision pass needs {need / 2**30:.1f} GiB free in {work} for the "
                                 f"inputs of {len(todo)} layers, {free / 2**30:.1f} GiB are free; use fewer "
                                 "calibration windows or a folder on a larger disk")
        y = offload.host_empty(shape, x.dtype, pin=device.type == "cuda")
        for i in range(max(todo) + 1 if todo else 0):
            if i in todo:
                offload.activations("disk", shape, x.dtype, work, f"layer_{i:03d}").copy_(x)
            if i < max(todo):
                layer = source.layer(i).float()
                layer_input_absmax(layer, family, x, kwargs, cfg.batch_size, out=y)
                x, y = y, x
                del layer
                source.release(i)
        say(f"full-precision pass: inputs of {len(todo)} layer(s) written in {time.time() - t0:.1f} s")

    together(dist, "the full-precision pass", (lambda: fp_pass(inps)) if dist.main else lambda: None)
    inps = None  # rank 0 kept only the layers' memmaps
    errors = []
    for rnd in assign(todo, dist.world):
        result, err = None, None
        if dist.rank < len(rnd):
            i = rnd[dist.rank]
            t = time.time()
            try:
                x = offload.open_activations(work, f"layer_{i:03d}", shape, dtype)
                (work / f"layer_{i:03d}.bin").unlink(missing_ok=True)  # read whole: free its disk space now
                layer = source.layer(i)
                timings: dict = {}
                layer, _targets, row = calibrate_layer(layer, family, config, qcfg, cfg, x, kwargs,
                                                       _layer_seed(seed, i), amp, saved=None, log=say, index=i,
                                                       timings=timings, device=device,
                                                       targets=offload.host_empty(shape, dtype))
                row["seconds"], row["rank"] = round(time.time() - t, 2), dist.rank
                _epoch_seconds(row, timings)
                result = (i, write_layer_file(store.dir, i, layer), row)
                del layer, _targets, x
            except Exception as e:  # gathered: every rank stops after this round
                err = f"layer {i}: {_message(e)}"
            finally:
                source.release(i)
                _free()
        gathered = dist.gather((result, err))
        for res, _e in gathered:
            if res is not None:
                i, digest, row = res
                if dist.main:
                    store.record_layer(i, digest, row)
                    progress.done(row)
                rows[i] = row
        errors = [(r, e) for r, (_res, e) in enumerate(gathered) if e]
        if errors:
            break
    if errors:
        r, e = errors[0]
        left = n_layers - len(rows)
        raise RankFailed(f"rank {r} failed on {e}; the finished layers are saved and rerunning the same "
                         f"command resumes the {left} layer(s) left")
    return rows


@torch.no_grad()
def gptq_streaming(source: offload.LayerSource, store: LayerStore, qcfg: QuantConfig, cfg: CalibConfig,
                   windows: torch.Tensor, act_dtype: torch.dtype, log=print, dist: Dist | None = None,
                   mode: str = "cpu", work: Path | None = None) -> dict:
    """GPTQ weights for every layer of a streamed model, layer by layer as `methods.gptq.apply_gptq`: each
    layer quantized with its saved parameters, its Hessians from the outputs of the GPTQ layers before it;
    the codes are saved into its layer file (by rank 0). The inputs live in host memory (`mode` "cpu", or
    "disk": a memmap in `work`), one mini-batch at a time on the device; the Hessians are solved one group
    at a time, over the ranks of `dist` (every rank runs the same layers; methods.gptq_shard)."""
    from flatquant.methods import gptq
    from flatquant.methods.flatquant import layer_transforms
    from flatquant.methods.gptq_shard import gptq_layer_sharded

    dist = dist or Dist()
    device, family, config, model_dtype = source.device, source.family, source.config, source.dtype
    _free()  # calibration's cached blocks: GPTQ's 70B-sized Hessians need them
    t0 = time.time()
    shape = (int(windows.shape[0]), int(windows.shape[1]), int(config.hidden_size))
    x = offload.activations(mode, shape, act_dtype, work, f"gptq_rank{dist.rank}", pin=device.type == "cuda")
    _, kwargs = capture_layer_inputs(source.skeleton(), family, windows, act_dtype, out=x)
    source.unload()
    rows = []
    for i in range(source.num_layers):
        t = time.time()
        hessians: dict = {}

        def load_and_measure():
            saved = store.load_layer(i)
            layer = source.layer(i).float()
            quantize_layer(layer, family, qcfg, layer_transforms(config, cfg, torch.Generator().manual_seed(0),
                                                                 layer=layer),
                           learnable_clip=cfg.learn_clip, index=i, split_kv_clip=cfg.kv_clip_split)
            layer.to(device)
            load_layer_state(layer, saved, i)
            freeze(layer, dtype=model_dtype)
            cast_weights(layer, model_dtype)
            dtypes = {name: v.dtype for name, v in gptq._tensors(layer)}

            def hook(key):
                def pre(_mod, args):
                    hessians.setdefault(key, gptq.Hessian(args[0].shape[-1], args[0].device)).add(args[0])
                return pre

            handles = [q.register_forward_pre_hook(hook(k)) for k, q in gptq._site_quantizers(layer, family).items()]
            try:
                run_layer(layer, x, kwargs, cfg.batch_size, model_dtype)
            finally:
                for h in handles:
                    h.remove()
            unfreeze(layer)
            layer.float()
            load_layer_state(layer, saved, i)
            return layer, dtypes

        layer, dtypes = together(dist, f"GPTQ layer {i}", load_and_measure)
        row, err = gptq_layer_sharded(layer, family, hessians, qcfg, dist)  # consumes the Hessians
        if err:
            raise RankFailed(f"GPTQ layer {i} failed on {err}")
        row = {"layer": i, **row}

        def save_and_advance():
            if dist.main:
                store.save_layer(i, layer)
            freeze(layer, dtype=model_dtype)
            gptq._restore_dtypes(layer, dtypes)
            run_layer(layer, x, kwargs, cfg.batch_size, model_dtype, out=x)

        together(dist, f"GPTQ layer {i}", save_and_advance)
        layer = None  # freed before the next layer is read
        source.release(i)
        _free()
        row["seconds"] = round(time.time() - t, 2)
        eta = (time.time() - t0) / (i + 1) * (source.num_layers - i - 1)
        log(f"gptq layer {i:3d}: output error rtn {row['rtn_err']:.4g} -> gptq {row['gptq_err']:.4g} "
            f"({row['seconds']:.1f} s); ETA {_fmt(eta)}")
        rows.append(row)
    x = None
    if mode == "disk":
        (Path(work) / f"gptq_rank{dist.rank}.bin").unlink(missing_ok=True)
    return {"nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "damp": qcfg.gptq_damp,
            "block": qcfg.gptq_block, "act_order": qcfg.gptq_act_order, "seconds": round(time.time() - t0, 2),
            "layers": rows, "streamed": True}


def layer_seconds(rows: list[dict]) -> float:
    """Median seconds per trained layer (resumed layers excluded); nan when none."""
    s = sorted(r["seconds"] for r in rows if "seconds" in r and not r.get("resumed"))
    return s[len(s) // 2] if s else math.nan
