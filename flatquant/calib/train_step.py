"""One optimisation step of block-wise calibration, run eagerly or replayed from a CUDA graph.

Why a graph: a FlatQuant training step on a small layer is a couple of thousand tiny kernels (Kronecker
matmuls, fake quantizers, Cayley maps and their backward). On an H100 the GPU finishes them faster
than Python can launch them, so an eager step of SmolLM2 costs ~50-100 ms of CPU time for ~10 ms of
GPU work. Capturing the step (forward, backward, AdamW) once per layer and replaying it removes the
launch overhead; the arithmetic is the same kernels on the same data.

The capture follows PyTorch's whole-network recipe: static input buffers, a few warm-up steps on a
side stream, gradients set to None before capture, a capturable AdamW with tensor learning rates.
The warm-up steps are then undone (parameters and optimizer state restored), so a graphed run
follows the same trajectory as an eager one. If capture fails, the step falls back to eager mode.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from flatquant.core.transforms import step_cache


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from `base` to 0 over `total` steps (the learning rate of step `step`, 0-based)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def layer_output(out):
    """A decoder layer returns a tensor or a tuple whose first item is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layer(layer, inps: torch.Tensor, kwargs: dict, batch_size: int, dtype: torch.dtype = torch.float32,
              out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Run a decoder layer over `inps` batch by batch (inputs cast to `dtype`); outputs go into `out`
    (may be `inps` itself: each batch is read before it is overwritten) or are dropped when out is None
    (a pass run only for its hooks)."""
    device = next((t.device for t in (*layer.parameters(), *layer.buffers())), inps.device)
    for s in range(0, inps.shape[0], batch_size):  # inps may live in host memory: one batch moves over at a time
        y = layer_output(layer(inps[s:s + batch_size].to(device).to(dtype), **kwargs))
        if out is not None:
            out[s:s + batch_size] = y.to(out.dtype)
    return out


class HostBatches:
    """Mini-batches of activations that may live in host memory (pinned or a disk memmap), gathered into
    pinned staging buffers and copied to the compute device asynchronously; the same values as `x[idx]`."""

    def __init__(self, device: torch.device, slots: int = 4):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.slots, self.k = slots, 0
        self.stage: dict = {}  # (slot, shape, dtype) -> (pinned buffer, event of the copy that last read it)

    def __call__(self, x: torch.Tensor, idx) -> torch.Tensor:
        if x.device.type == self.device.type or not self.cuda:  # already there, or a CPU compute device
            b = x[idx]
            return b if b.device.type == self.device.type else b.to(self.device)
        idx = idx.cpu() if torch.is_tensor(idx) else torch.arange(x.shape[0])[idx]
        self.k = (self.k + 1) % self.slots
        key = (self.k, (len(idx), *x.shape[1:]), x.dtype)
        buf, event = self.stage.get(key, (None, None))
        if buf is None:
            buf = torch.empty(key[1], dtype=x.dtype, pin_memory=True)
        elif event is not None:
            event.synchronize()  # the copy that last read this buffer has finished
        torch.index_select(x, 0, idx, out=buf)
        out = buf.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.stage[key] = (buf, event)
        return out


def autocast(amp: bool, device: torch.device):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def calib_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """"mse": mean squared error; "nmse-token": each token's squared error over its target's mean square,
    averaged over tokens (a few very large tokens, e.g. attention sinks, no longer dominate)."""
    err = (out.float() - target.float()) ** 2
    if kind == "mse":
        return torch.mean(err)
    if kind == "nmse-token":
        return torch.mean(err.mean(-1) / target.float().pow(2).mean(-1).clamp(min=1e-12))
    raise ValueError(f"unknown calibration loss {kind!r}")


class LayerStepper:
    """AdamW on `groups` (param groups with a base "lr"), minimising calib_loss(layer(x), target)."""

    def __init__(self, layer: nn.Module, groups: list[dict], kwargs: dict, amp: bool, weight_decay: float,
                 example_x: torch.Tensor, example_t: torch.Tensor, cuda_graph: bool = True, log=print,
                 loss: str = "mse"):
        self.layer, self.kwargs, self.amp, self.loss = layer, kwargs, amp, loss
        self.device = example_x.device
        self.cuda = self.device.type == "cuda"
        self.base_lrs = [g["lr"] for g in groups]
        if self.cuda:  # tensor learning rates: a replayed graph reads them from device memory
            for g in groups:
                g["lr"] = torch.tensor(float(g["lr"]), device=self.device)
            self.opt = torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True, capturable=True)
        else:
            self.opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)  # all losses so far finite?
        self.loss_sum = torch.zeros((), device=self.device)  # sum of the step losses since epoch_loss()
        self.steps = 0
        self.graph = None
        if cuda_graph and self.cuda:
            self.x, self.t = example_x.clone(), example_t.clone()
            try:
                self._capture()
            except Exception as e:
                log(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                    "training this layer eagerly")
                self.graph = None
                torch.cuda.synchronize()

    def _forward_backward_update(self, x: torch.Tensor, t: torch.Tensor) -> None:
        with step_cache(self.layer), autocast(self.amp, self.device):
            out = layer_output(self.layer(x.float(), **self.kwargs))
            loss = calib_loss(out, t, self.loss)
        loss.backward()
        self.opt.step()
        self.finite &= torch.isfinite(loss.detach())  # read once per epoch: a per-step check syncs the GPU
        self.loss_sum += loss.detach().float()

    def _capture(self) -> None:
        params = [p for g in self.opt.param_groups for p in g["params"]]
        snapshot = [p.detach().clone() for p in params]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: allocator, cuBLAS handles, optimizer state
                self.opt.zero_grad(set_to_none=True)
                self._forward_backward_update(self.x, self.t)
        torch.cuda.current_stream().wait_stream(side)
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._forward_backward_update(self.x, self.t)
        with torch.no_grad():  # undo the warm-up: same start as an eager run
            for p, s in zip(params, snapshot):
                p.copy_(s)
            for state in self.opt.state.values():
                for v in state.values():
                    if torch.is_tensor(v):
                        v.zero_()
            self.finite.fill_(True)
            self.loss_sum.zero_()
        self.graph = graph

    def step(self, x: torch.Tensor, t: torch.Tensor, index: int, total: int) -> None:
        """Optimisation step number `index` (0-based) of `total`, on inputs x and targets t."""
        self.steps += 1
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            lr = cosine_lr(base, index, total)
            if torch.is_tensor(g["lr"]):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        if self.graph is not None and x.shape == self.x.shape:
            self.x.copy_(x)
            self.t.copy_(t)
            self.graph.replay()
        else:  # no graph, or a last partial batch of another shape
            self.opt.zero_grad(set_to_none=self.graph is None)  # keep the graph's static gradient buffers
            self._forward_backward_update(x, t)

    def epoch_loss(self) -> float:
        """The mean training loss of the steps since the last call (read once per epoch), then reset."""
        mean = self.loss_sum.item() / max(self.steps, 1)
        self.loss_sum.zero_()
        self.steps = 0
        return mean

    def all_finite(self) -> bool:
        return bool(self.finite.item())
