"""Layer streaming: a model's decoder layers materialised one at a time, and activations kept off the GPU.

- `ShardedSource` reads a Hugging Face folder's safetensors shards lazily (`safe_open`, tensor by tensor,
  straight onto the compute device): the model skeleton lives on the meta device, only the modules before
  the decoder layers (embeddings, rotary tables) and one decoder layer at a time hold real memory. The whole
  model is never in CPU memory.
- `ModuleSource` streams layers from a model already loaded in CPU memory (GGUF files, `--offload cpu`).
- `activations` gives the calibration activations (windows x seqlen x hidden) a home in CPU memory (pinned
  when a GPU is used) or in a disk memmap under the work folder (`--offload disk`).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flatquant.calib.residency import host_buffers
from flatquant.errors import ModelError
from flatquant.models.families import Family, family_for

OFFLOAD_MODES = ("none", "cpu", "disk")
_NP_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


class ShardIndex:
    """Tensor name -> the safetensors shard of a model folder that holds it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {k: self.folder / v for k, v in weight_map.items()}
        else:
            from safetensors import safe_open

            self.where = {}
            for shard in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(shard), framework="pt") as f:
                    self.where.update({k: shard for k in f.keys()})
        if not self.where:
            raise ModelError(f"{self.folder}: no safetensors weights to stream (model.safetensors missing)")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, names: list[str], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The named tensors, read shard by shard onto `device` and cast to `dtype`."""
        from safetensors import safe_open

        by_shard: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.where:
                raise ModelError(f"{self.folder}: weight {n} is missing from the safetensors shards")
            by_shard.setdefault(self.where[n], []).append(n)
        out = {}
        dev = "cpu" if device.type == "meta" else str(device)
        for shard, keys in by_shard.items():
            with safe_open(str(shard), framework="pt", device=dev) as f:
                for k in keys:
                    t = f.get_tensor(k)
                    out[k] = t.to(dtype) if t.is_floating_point() else t
        return out


def _set_tensor(root: nn.Module, dotted: str, value: torch.Tensor, param: bool) -> None:
    mod_name, _, leaf = dotted.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if param:
        setattr(mod, leaf, nn.Parameter(value, requires_grad=False))
    else:
        mod._buffers[leaf] = value


class LayerSource:
    """Common interface: `skeleton()` (model whose decoder layers may be on the meta device), `layer(i)`
    (decoder layer i, real, on the compute device, in the model dtype), `release(i)`."""

    config = None
    family: Family
    device: torch.device
    dtype: torch.dtype
    limit: int | None = None  # stream only the first `limit` layers (benchmarks)

    @property
    def num_layers(self) -> int:
        n = int(self.config.num_hidden_layers)
        return n if self.limit is None else min(n, self.limit)


class ShardedSource(LayerSource):
    """Decoder layers read lazily from a Hugging Face folder's safetensors shards."""

    def __init__(self, folder: str | Path, device: torch.device | str, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder, self.device, self.dtype = Path(folder), torch.device(device), dtype
        self.config = AutoConfig.from_pretrained(str(self.folder))
        self.family = family_for(self.config)
        self.index = ShardIndex(self.folder)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        self.model.config.use_cache = False
        self.prefix = self.family.layers + "."
        self._templates = list(self.family.decoder_layers(self.model))
        self._skeleton_ready = False

    def skeleton(self) -> nn.Module:
        """The model with every module outside the decoder layers real (output head excepted: calibration
        never reaches it), the decoder layers on the meta device."""
        if self._skeleton_ready:
            return self.model
        head = self.model.get_output_embeddings()
        tied = head is not None and head.weight is self.model.get_input_embeddings().weight
        skip = set() if head is None or tied else {id(p) for p in head.parameters()}
        names = [n for n, p in self.model.named_parameters() if not n.startswith(self.prefix) and id(p) not in skip]
        for n, t in self.index.read(names, self.device, self.dtype).items():
            _set_tensor(self.model, n, t, param=True)
        persistent = {n for n, _ in self.model.named_buffers() if n in self.index}
        for n, t in self.index.read(sorted(persistent), self.device, self.dtype).items():
            _set_tensor(self.model, n, t, param=False)
        for name, mod in list(self.model.named_modules()):  # non-persistent buffers (rotary tables): rebuilt
            if name.startswith(self.prefix) or name == self.family.layers:
                continue
            own = [b for b, v in mod.named_buffers(recurse=False) if v.is_meta and f"{name}.{b}" not in persistent]
            if own:
                try:
                    fresh = type(mod)(getattr(mod, "config", self.config))
                except Exception as e:
                    raise ModelError(f"cannot stream this model: {name} ({type(mod).__name__}) cannot be rebuilt "
                                     f"({type(e).__name__}); use --offload none") from e
                parent, _, leaf = name.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, leaf, fresh.to(self.device))
        self._skeleton_ready = True
        return self.model

    def unload(self) -> None:
        """Put the modules outside the decoder layers back on the meta device (once the layer inputs are
        captured, the embeddings are not needed); `skeleton()` reads them again."""
        for n, p in list(self.model.named_parameters()):
            if not n.startswith(self.prefix) and not p.is_meta:
                _set_tensor(self.model, n, torch.empty_like(p, device="meta"), param=True)
        self._skeleton_ready = False

    def layer(self, i: int) -> nn.Module:
        template = self._templates[i]
        if any(True for _ in template.buffers()):
            raise ModelError(f"cannot stream this model: decoder layer {i} holds buffers; use --offload none")
        layer = copy.deepcopy(template, memo={id(self.model.config): self.model.config})
        names = [n for n, _ in layer.named_parameters()]
        tensors = self.index.read([f"{self.prefix}{i}.{n}" for n in names], self.device, self.dtype)
        for n in names:
            _set_tensor(layer, n, tensors[f"{self.prefix}{i}.{n}"], param=True)
        self.family.decoder_layers(self.model)[i] = layer
        return layer

    def release(self, i: int) -> None:
        self.family.decoder_layers(self.model)[i] = self._templates[i]


class ModuleSource(LayerSource):
    """Decoder layers of a model held in CPU memory, copied one at a time to the compute device."""

    def __init__(self, model: nn.Module, device: torch.device | str):
        self.model, self.device = model, torch.device(device)
        self.config, self.family = model.config, family_for(model)
        self.dtype = next(model.parameters()).dtype
        self._originals = list(self.family.decoder_layers(model))
        self._moved = False

    def unload(self) -> None:
        """Nothing to free: the model stays in CPU memory."""

    def skeleton(self) -> nn.Module:
        """The model, with every tensor outside the decoder layers moved to the compute device."""
        if not self._moved:
            prefix = self.family.layers + "."
            for name, mod in self.model.named_modules():
                if name == self.family.layers or name.startswith(prefix):
                    continue
                for _k, p in mod.named_parameters(recurse=False):
                    p.data = p.data.to(self.device)
                for k, b in mod.named_buffers(recurse=False):
                    mod._buffers[k] = b.to(self.device)
            self._moved = True
        return self.model

    def layer(self, i: int) -> nn.Module:
        layer = copy.deepcopy(self._originals[i], memo={id(self.model.config): self.model.config}).to(self.device)
        self.family.decoder_layers(self.model)[i] = layer
        return layer

    def release(self, i: int) -> None:
        self.family.decoder_layers(self.model)[i] = self._originals[i]


def activations(mode: str, shape: tuple[int, ...], dtype: torch.dtype, folder: Path | None, name: str,
                pin: bool = False) -> torch.Tensor:
    """A CPU tensor for calibration activations: in memory ("cpu"/"none"), or backed by a memmap file
    `folder/name.bin` ("disk"; the file lives while the tensor does, remove it with `drop_activations`)."""
    if mode != "disk":
        return host_empty(shape, dtype, pin)
    if folder is None:
        raise ValueError("disk activations need a folder")
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.memmap(folder / f"{name}.bin", dtype=_NP_STORAGE[dtype], mode="w+", shape=shape)
    with host_buffers():
        t = torch.from_numpy(arr)
        return t.view(dtype) if dtype == torch.bfloat16 else t


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
    """An activation buffer in CPU memory (pinned for fast copies to a GPU), off the compute device."""
    with host_buffers():
        return torch.empty(shape, dtype=dtype, pin_memory=pin)


def open_activations(folder: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Read-only view of activations another process wrote with `activations(mode="disk")`."""
    arr = np.memmap(folder / f"{name}.bin", dtype=_NP_STORAGE[dtype], mode="r", shape=shape)
    with host_buffers():
        t = torch.from_numpy(np.array(arr))  # a private copy: the layer reads it many times
        return t.view(dtype) if dtype == torch.bfloat16 else t


def drop_activations(folder: Path | None) -> None:
    if folder is not None and folder.is_dir():
        for f in folder.glob("*.bin"):
            f.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass


def shard_fingerprint(source: ShardedSource, sample: int = 256) -> str:
    """`integrity.model_fingerprint` of the model as loaded in `source.dtype`, read from the shards (only the
    rows holding the sampled values), so a streamed calibration names its model like an in-memory one."""
    import hashlib

    from safetensors import safe_open

    h = hashlib.sha256()
    for name, p in sorted(source.model.named_parameters(), key=lambda kv: kv[0]):
        if name not in source.index:  # a tied output head (the loaded model lists it under its embeddings)
            continue
        numel = p.numel()
        step = max(1, numel // sample)
        idx = torch.arange(0, numel, step)[:sample]
        with safe_open(str(source.index.where[name]), framework="pt") as f:
            sl = f.get_slice(name)
            if p.dim() <= 1:
                vals = sl[:].reshape(-1)[idx]
            else:
                cols = numel // p.shape[0]
                rows = {int(r): sl[int(r):int(r) + 1].reshape(-1) for r in torch.unique(idx // cols)}
                vals = torch.stack([rows[int(i) // cols][int(i) % cols] for i in idx])
        vals = vals.to(source.dtype).to(torch.float16)
        h.update(f"{name}:{tuple(p.shape)}:".encode())
        h.update(vals.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]
