"""The packed checkpoint layout (version 1): names, the `quantization_config` block, folder checks.

Documented for engine plugins in docs/CHECKPOINT.md. Tensor names follow the Hugging Face module tree of
the packed model (flatquant.runtime.modules), so `state_dict` keys and checkpoint keys are the same.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from flatquant.errors import CheckpointError
from flatquant.models.families import SITES as SITE_ROLES

QUANT_METHOD = "flatquant"
LAYOUT_VERSION = 1
CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SITES = ("attn_in", "o_in", "mlp_in", "down_in")  # online transform sites: q/k/v, o_proj, gate/up, down_proj
FUSED_QKV = "fq_qkv"  # under the attention module: q, k, v rows concatenated
FUSED_GATE_UP = "fq_gate_up"  # under the MLP module: gate, up rows concatenated
KV_MODULE = "fq_kv"  # under the attention module: key transform, query inverse, KV clip values


def quant_block(w_bits: int, a_bits: int, kv_bits: int, head_dim: int, sites: dict, key_factors: dict,
                dtype: str) -> dict:
    """The `quantization_config` block of config.json (everything a loader needs to build the modules)."""
    return {
        "quant_method": QUANT_METHOD,
        "layout_version": LAYOUT_VERSION,
        "w_bits": w_bits, "a_bits": a_bits, "kv_bits": kv_bits,
        "weight": {"bits": w_bits, "symmetric": True, "group_size": None, "granularity": "per-output-channel",
                   "packing": "int4-halves"},
        "activation": {"bits": a_bits, "symmetric": True, "group_size": None, "granularity": "per-token"},
        "kv_cache": {"bits": kv_bits, "symmetric": False, "group_size": head_dim,
                     "granularity": "per-token-head", "packing": "int4-pairs"},
        "sites": sites,  # site -> {"p1": n1 or None, "p2": n2 or None}
        "key_transform": key_factors,  # {"p1": n1 or None, "p2": n2 or None} (query factors: same sizes)
        "fused": {FUSED_QKV: list(SITE_ROLES["attn_in"]), FUSED_GATE_UP: list(SITE_ROLES["mlp_in"])},
        "dtype": dtype,
    }


def read_config(path: str | Path) -> dict:
    """config.json of a packed checkpoint, checked to be one of ours with a known layout version."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG} (not a flatquant checkpoint)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: corrupt JSON") from e
    q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path}: not a flatquant checkpoint (config.json has no quantization_config "
                              f"with quant_method '{QUANT_METHOD}')")
    if q.get("layout_version") != LAYOUT_VERSION:
        raise CheckpointError(f"{path}: unknown flatquant layout version {q.get('layout_version')!r} "
                              f"(this flatquant reads version {LAYOUT_VERSION})")
    return cfg


def shard_files(path: str | Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index (several shards) or the single file."""
    path = Path(path)
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX}: corrupt index") from e
        return dict(weight_map)
    if (path / SINGLE).is_file():
        return {name: SINGLE for name in read_header(path / SINGLE)}
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX} (missing shard)")


def read_header(file: Path) -> dict[str, dict]:
    """The tensors of a safetensors file (name -> dtype, shape, offsets), checking the file is complete."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing shard")
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{file}: corrupt or truncated safetensors header") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if size != 8 + n + end:
        raise CheckpointError(f"{file}: truncated shard ({size} bytes, the header describes {8 + n + end})")
    return header


def check_tensors(path: str | Path, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Every expected tensor is present with its shape and dtype, and nothing else is there."""
    path = Path(path)
    weight_map = shard_files(path)
    headers = {f: read_header(path / f) for f in sorted(set(weight_map.values()))}
    for name, (shape, dtype) in expected.items():
        if name not in weight_map:
            raise CheckpointError(f"{path}: tensor {name} is missing")
        info = headers[weight_map[name]].get(name)
        if info is None:
            raise CheckpointError(f"{path}: tensor {name} is not in its shard {weight_map[name]}")
        if tuple(info["shape"]) != tuple(shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(info['shape'])}, "
                                  f"expected {tuple(shape)} (shape mismatch)")
        if info["dtype"] != dtype:
            raise CheckpointError(f"{path}: tensor {name} is {info['dtype']}, expected {dtype}")
    extra = sorted(set(weight_map) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]} (settings mismatch?)")


ST_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.uint8": "U8",
             "torch.int8": "I8", "torch.int32": "I32", "torch.int64": "I64"}
