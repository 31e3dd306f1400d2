"""Results records: one JSON file per evaluated configuration, with provenance.

Every number shown in a doc comes from one of these records. A record always carries the command
that produced it, the git commit and the device, so it can be traced and reproduced.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from flatquant.io import atomic_write_text  # re-exported: older callers import it from here


def git_commit() -> str:
    """The checkout's commit (with '+dirty' when the tree has changes), or 'unknown' outside git.
    FLATQUANT_GIT_COMMIT overrides it (a copy of the tree without .git, e.g. on a GPU machine)."""
    if os.environ.get("FLATQUANT_GIT_COMMIT"):
        return os.environ["FLATQUANT_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip()
        if not sha:
            return os.environ.get("FLATQUANT_GIT_COMMIT", "unknown")
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("FLATQUANT_GIT_COMMIT", "unknown")


def device_name(device: str | torch.device | None = None) -> str:
    """Human-readable device: the GPU's name, or 'cpu'."""
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev if dev is not None and dev.index is not None else 0)
    return "cpu"


def command_line() -> str:
    prog = sys.argv[0]
    pkg = Path(__file__).resolve().parent
    if prog == "-m":
        prog = "python -m flatquant"
    elif prog.endswith(".py") and Path(prog).resolve().parent == pkg:  # `python -m flatquant[.report]`
        stem = Path(prog).stem
        prog = "python -m flatquant" + ("" if stem == "__main__" else f".{stem}")
    elif prog.endswith(".py"):
        prog = "python " + os.path.relpath(prog)
    else:
        prog = Path(prog).name
    return " ".join([prog, *sys.argv[1:]])


def provenance(device: str | torch.device | None = None) -> dict:
    return {
        "device": device_name(device),
        "git_commit": git_commit(),
        "command": command_line(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", s).strip("-")


# Settings fields and the value an older record without them means.
SETTING_DEFAULTS = {"w_group_size": None, "w_asym": False, "kv_group_size": None, "mixed": None,
                    "trained_bits": None}


def bits_tag(record: dict) -> str:
    """W4A4KV4, or W16A16K2V4 when the record's key and value bits differ (k_bits/v_bits absent: kv_bits)."""
    k, v = record.get("k_bits", record["kv_bits"]), record.get("v_bits", record["kv_bits"])
    return f"W{record['w_bits']}A{record['a_bits']}" + (f"KV{k}" if k == v else f"K{k}V{v}")


def settings_tags(record: dict) -> list[str]:
    """Name parts of the settings that differ from their defaults (none for a default record)."""
    r = {**SETTING_DEFAULTS, **record}
    parts = [f"g{r['w_group_size']}" if r["w_group_size"] else "", "wasym" if r["w_asym"] else "",
             f"kvg{r['kv_group_size']}" if r["kv_group_size"] else ""]
    if r["mixed"]:
        parts.append("mixed-" + hashlib.sha1(str(r["mixed"]).encode()).hexdigest()[:8])
    if r["trained_bits"] and "w_bits" in r and r["trained_bits"] != bits_tag(r):
        parts.append(f"trained-{r['trained_bits']}")
    return [p for p in parts if p]


def record_name(record: dict) -> str:
    """Stable file name for a record: same configuration -> same file (a re-run replaces it). GPTQ weights
    add "gptq" after the bits; RTN names carry no weight-quantizer part (the names of older records)."""
    model = Path(str(record.get("model", "model"))).name  # not .stem: "Qwen2.5-0.5B" must stay whole
    model = model[: -len(".gguf")] if model.lower().endswith(".gguf") else model
    parts = [record.get("kind", "ppl"), model, record.get("method", "")]
    if "w_bits" in record:
        parts.append(bits_tag(record))
    parts += settings_tags(record)
    if record.get("weight_quantizer") == "gptq":
        parts.append("gptq")
    if record.get("variant"):
        parts.append(record["variant"])
    if record.get("dataset"):
        parts.append(record["dataset"])
    for key, tag in (("max_windows", "maxwin"), ("limit", "limit")):  # a capped run never replaces a full one
        if record.get(key) is not None:
            parts.append(f"{tag}{record[key]}")
    return _slug("_".join(str(p) for p in parts if p)) + ".json"


def write_record(record: dict, results_dir: str | Path = "results") -> Path:
    """Add provenance (unless already present) and write the record atomically under results_dir."""
    full = {**provenance(), **record}
    return atomic_write_text(Path(results_dir) / record_name(full), json.dumps(full, indent=2, sort_keys=True) + "\n")


def load_records(results_dir: str | Path = "results") -> list[dict]:
    out = []
    for p in sorted(Path(results_dir).rglob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            rec["_path"] = str(p)
            out.append(rec)
    return out
