"""Integrity of saved parameters: reproducible safetensors files, checksums, model fingerprints.

- `write_safetensors` writes the same bytes for the same tensors (header keys sorted, tensors in name
  order), with mode 0644 like every other output file, to a temporary name that is renamed when whole;
  a full disk or any other write failure is one `CheckpointError` line and leaves no temporary file.
- `sha256_file` / `verify_layer_file` catch bytes changed after writing (flatquant.json keeps a sha256
  per layer file).
- `model_fingerprint` identifies a model by its sizes and a sample of its weights, so parameters
  calibrated on one model are not silently reused for another one with the same shapes.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import torch

from flatquant.errors import CheckpointError, ModelError

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
           torch.bool: "BOOL"}
KEEP_META_KEYS = ("model_fingerprint", "checksums")  # kept when a LayerStore rewrites flatquant.json


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors serialisation of `tensors`, deterministic: sorted keys, tensors in name order."""
    header: dict = {"__metadata__": {str(k): str(v) for k, v in sorted((metadata or {}).items())}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be saved")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def _write_file(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path` (mode 0644), fsync, rename. Any failure (ENOSPC...)
    removes the temporary file and raises CheckpointError with one line."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        _write_file(fd, data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(f"cannot write {path}: {why}; the layers saved before it are kept, "
                              "so the same command resumes once the problem is fixed") from None


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """Write a reproducible safetensors file atomically; returns its sha256."""
    data = safetensors_bytes(tensors, metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_layer_file(path: Path, checksums: dict | None) -> None:
    """CheckpointError when `path` no longer has the sha256 recorded when it was written."""
    expected = (checksums or {}).get(path.name)
    if expected and sha256_file(path) != expected:
        raise CheckpointError(f"{path}: contents changed since it was saved (sha256 mismatch); "
                              "recalibrate that folder with --no-resume")


def check_finite_state(state: dict[str, torch.Tensor], path: Path) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: saved parameter {k} holds NaN/inf values; recalibrate with --no-resume")


def check_finite_weights(model: torch.nn.Module, what: str = "model") -> None:
    """ModelError when any weight of `model` is NaN or infinite (nothing useful can be computed from it)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise ModelError(f"{what}: weight {name} has {bad} NaN/inf value(s); the checkpoint is damaged")


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module, sample: int = 256) -> str:
    """A short hash of the model's parameter names, shapes and a strided sample of each one's values
    (rounded to float16, so the same checkpoint loaded in float16 or float32 gives the same value)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        vals = flat[::step][:sample].to(device="cpu", dtype=torch.float16)
        h.update(f"{name}:{tuple(p.shape)}:".encode())
        h.update(vals.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def carry_meta(store) -> None:
    """Keep the fingerprint and checksums already in a LayerStore's flatquant.json when it rewrites it."""
    path = store.dir / "flatquant.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(old, dict):
        for key in KEEP_META_KEYS:
            if key in old and key not in store.meta:
                store.meta[key] = old[key]
