"""Saved FlatQuant parameters: one safetensors file per decoder layer plus `flatquant.json` (settings).

Layout of an output folder:
    flatquant.json            model sizes, QuantConfig, CalibConfig, layers done, per-layer losses, and
                              "epoch_losses": {layer: [mean training loss of each epoch]} (older folders lack it)
    layers/layer_000.safetensors ...   transforms, scales and clipping logits of each layer (float32), and
                              with GPTQ its weights: <linear>.gptq_codes (int8), .gptq_scale, .gptq_zero
Every file is written to a temporary name and renamed, so an interrupted run leaves only whole files,
and a rerun resumes after the last complete layer.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flatquant.calib import integrity
from flatquant.config import CalibConfig, QuantConfig
from flatquant.core.modules import QuantLinear
from flatquant.errors import CheckpointError
from flatquant.io import atomic_write_text
from flatquant.models.families import Family

FORMAT = "flatquant-params-v1"
META = "flatquant.json"
HISTORY = "epoch_losses"  # {layer index (str): [mean training loss per epoch]}; absent in older folders
SIZE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "num_hidden_layers")


def model_sizes(config) -> dict:
    sizes = {k: getattr(config, k, None) for k in SIZE_KEYS}
    sizes["head_dim"] = Family.head_dim(config)
    return sizes


def read_meta(out_dir: str | Path) -> dict:
    path = Path(out_dir) / META
    if not path.is_file():
        raise CheckpointError(f"{out_dir}: no {META} (not a flatquant parameter folder)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e.msg})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format (expected {FORMAT})")
    return meta


def check_model_matches(meta: dict, config) -> None:
    mine = model_sizes(config)
    diff = {k: (meta["sizes"].get(k), v) for k, v in mine.items() if meta["sizes"].get(k) != v}
    if diff:
        k, (saved, now) = next(iter(diff.items()))
        raise CheckpointError(f"saved transforms do not fit this model: {k} is {saved} in the file, {now} in the model")


def epoch_losses(meta: dict) -> dict[int, list[float]]:
    """Each layer's per-epoch training losses saved in a folder's settings ({} for folders without them)."""
    hist = meta.get(HISTORY)
    if not isinstance(hist, dict):
        return {}
    out = {}
    for k, v in hist.items():
        if str(k).isdigit() and isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            out[int(k)] = [float(x) for x in v]
    return dict(sorted(out.items()))


def layer_path(out_dir: str | Path, i: int) -> Path:
    return Path(out_dir) / "layers" / f"layer_{i:03d}.safetensors"


def check_finished(folder: str | Path, what: str = "--params") -> dict:
    """The settings of a finished calibration folder (`flatquant quantize --output`); CheckpointError otherwise."""
    if not Path(folder).is_dir():
        raise CheckpointError(f"{what} {folder}: no such folder (create it with `flatquant quantize --output`)")
    meta = read_meta(folder)
    if not meta.get("complete"):
        raise CheckpointError(f"{what} {folder}: the calibration there is unfinished "
                              "(finish it with `flatquant quantize --output` on that folder)")
    return meta


def check_layer_files(folder: Path, meta: dict) -> None:
    """Each saved layer file has a readable safetensors header (a truncated file fails here, early)."""
    from safetensors import safe_open

    layers = meta.get("layers_done", []) if not meta.get("complete") else \
        range(int(meta.get("sizes", {}).get("num_hidden_layers") or 0))
    for i in layers:
        path = layer_path(folder, i)
        if not path.is_file():
            raise CheckpointError(f"{folder}: parameters for layer {i} are missing ({path.name})")
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({type(e).__name__})") from None


def check_saved_calibration(folder: Path, model_config, qcfg: QuantConfig, ccfg: CalibConfig | None) -> dict:
    """Saved parameters in `folder` fit the model (sizes) and, when ccfg is given, the requested settings
    (checked before any work, so a mismatch costs nothing). Returns the folder's settings."""
    meta = read_meta(folder)
    if not isinstance(meta.get("sizes"), dict) or not isinstance(meta.get("calib"), dict) \
            or not isinstance(meta.get("quant"), dict):
        raise CheckpointError(f"{folder}/{META}: missing sizes/quant/calib settings")
    check_model_matches(meta, model_config)
    quant_differs = QuantConfig.normalized(meta["quant"]) != qcfg.to_dict()  # older files lack newer fields
    if ccfg is not None and (quant_differs or CalibConfig.recipe_settings(meta["calib"])
                             != CalibConfig.recipe_settings(ccfg.to_dict())):
        key = "quantization settings (bits, weight quantizer)" if quant_differs else "calibration settings"
        raise CheckpointError(f"{folder} holds a calibration with other {key}; "
                              "use --no-resume to replace it, or another --output")
    check_layer_files(folder, meta)
    return meta


def eval_weight_settings(qcfg: QuantConfig, meta: dict, requested: str | None = None) -> QuantConfig:
    """The settings to evaluate a saved calibration with: unless another weight quantizer is `requested`,
    the saved one with its GPTQ settings (the weights as saved)."""
    saved = QuantConfig.from_dict(meta["quant"])
    if requested not in (None, saved.weight_quantizer):
        return qcfg
    return dataclasses.replace(qcfg, weight_quantizer=saved.weight_quantizer, gptq_damp=saved.gptq_damp,
                               gptq_block=saved.gptq_block, gptq_act_order=saved.gptq_act_order)


def gptq_plan(meta: dict, qcfg: QuantConfig) -> str | None:
    """How GPTQ weights for qcfg come from a saved calibration: "saved" (reuse the saved codes: made with
    the same weight settings), "run" (compute them now, on calibration windows) or None (RTN weights)."""
    if qcfg.weight_quantizer != "gptq":
        return None
    return "saved" if QuantConfig.from_dict(meta["quant"]).gptq_settings() == qcfg.gptq_settings() else "run"


def _is_gptq(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in QuantLinear.GPTQ_BUFFERS


def layer_state(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The learned tensors of a quantized layer (transforms, scales, clipping logits; float32) and its GPTQ
    weights when it has them (codes stay integers)."""
    out = {}
    for k, v in layer.state_dict().items():
        if k.startswith("fq_transforms.") or "clip_logit" in k or _is_gptq(k):
            v = v.detach()
            out[k] = (v.float() if v.is_floating_point() else v).contiguous().cpu()
    return out


def load_layer_state(layer: torch.nn.Module, state: dict[str, torch.Tensor], index: int, gptq: bool = False) -> None:
    """Load saved learned tensors into a freshly quantized layer. gptq: also set the saved GPTQ weights
    (every enabled weight quantizer must have them); otherwise saved GPTQ weights are ignored (RTN)."""
    own = {k: v for k, v in layer_state(layer).items() if not _is_gptq(k)}
    for k in [k for k in own if k not in state and "clip_logit" in k]:
        # that quantizer was off (16 bits) when the parameters were trained: it keeps its fixed clip ratio
        owner, attr = k.rsplit(".", 1)
        setattr(layer.get_submodule(owner), attr, None)
        del own[k]
    missing = [k for k in own if k not in state]
    if missing:
        raise CheckpointError(f"layer {index}: saved parameters lack {missing[0]} (settings mismatch?)")
    usable = {}
    for k, v in state.items():
        if _is_gptq(k):
            continue
        if k not in own:
            if "clip_logit" in k:  # that quantizer is disabled (16 bits) in this evaluation
                continue
            raise CheckpointError(f"layer {index}: unexpected saved parameter {k}")
        if own[k].shape != v.shape:
            raise CheckpointError(f"layer {index}: {k} has shape {tuple(v.shape)} in the file, "
                                  f"{tuple(own[k].shape)} in the model")
        usable[k] = v
    layer.load_state_dict(usable, strict=False)
    if gptq:
        _load_gptq(layer, {k: v for k, v in state.items() if _is_gptq(k)}, index)


def _load_gptq(layer: torch.nn.Module, state: dict[str, torch.Tensor], index: int) -> None:
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, QuantLinear)}
    for k in state:
        if k.rsplit(".", 1)[0] not in linears:
            raise CheckpointError(f"layer {index}: unexpected saved parameter {k}")
    for name, m in linears.items():
        if not m.w_quantizer.enabled:
            continue
        codes, scale, zero = (state.get(f"{name}.{b}") for b in QuantLinear.GPTQ_BUFFERS)
        if codes is None or scale is None or (zero is None) != m.w_quantizer.symmetric:
            raise CheckpointError(f"layer {index}: saved parameters lack the GPTQ weights of {name}")
        try:
            m.set_gptq(codes, scale, zero)
        except ValueError as e:
            raise CheckpointError(f"layer {index}: {name}: {e}") from None


def write_layer_file(out_dir: str | Path, i: int, layer: torch.nn.Module) -> str:
    """Write layer i's learned tensors to its file (atomically, reproducible bytes); returns its sha256."""
    path = layer_path(out_dir, i)
    path.parent.mkdir(parents=True, exist_ok=True)
    return integrity.write_safetensors(path, layer_state(layer), {"format": FORMAT, "layer": str(i)})


class LayerStore:
    """Reads and writes one calibration's per-layer parameter files."""

    def __init__(self, out_dir, model_config, qcfg: QuantConfig, ccfg: CalibConfig, check_existing: bool = True):
        self.dir = Path(out_dir)
        self.meta = {"format": FORMAT, "sizes": model_sizes(model_config), "quant": qcfg.to_dict(),
                     "calib": ccfg.to_dict(), "layers_done": [], "complete": False}
        if check_existing and (self.dir / META).is_file():
            old = read_meta(self.dir)
            for key in ("sizes", "quant", "calib"):
                a, b = old.get(key), self.meta[key]
                if key == "calib" and isinstance(a, dict):
                    a, b = CalibConfig.recipe_settings(a), CalibConfig.recipe_settings(b)
                if key == "quant" and isinstance(a, dict):  # a file from before a field existed compares equal
                    a, b = QuantConfig.normalized(a), QuantConfig.normalized(b)
                if a != b:
                    raise CheckpointError(f"{self.dir} holds a calibration with different {key}; "
                                          "use another output folder or --no-resume")
            self.meta["layers_done"] = old.get("layers_done", [])
            for key in (HISTORY, "layer_rows"):
                if isinstance(old.get(key), dict):
                    self.meta[key] = old[key]
        integrity.carry_meta(self)  # model fingerprint and per-file checksums

    def _path(self, i: int) -> Path:
        return layer_path(self.dir, i)

    def clear(self) -> None:
        if (self.dir / "layers").is_dir():
            shutil.rmtree(self.dir / "layers")
        (self.dir / META).unlink(missing_ok=True)
        self.meta["layers_done"] = []
        self.meta.pop("checksums", None)
        self.meta.pop(HISTORY, None)
        self.meta.pop("layer_rows", None)

    def set_epoch_losses(self, i: int, losses: list[float] | None) -> None:
        """Record layer i's per-epoch training losses (written with the layer's next save)."""
        if losses:
            self.meta.setdefault(HISTORY, {})[str(i)] = [float(x) for x in losses]

    def epoch_losses(self, i: int) -> list[float] | None:
        return self.meta.get(HISTORY, {}).get(str(i))

    def load_layer(self, i: int) -> dict[str, torch.Tensor] | None:
        path = self._path(i)
        if not path.is_file():
            return None
        integrity.verify_layer_file(path, self.meta.get("checksums"))
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from e
        integrity.check_finite_state(state, path)
        return state

    def save_layer(self, i: int, layer: torch.nn.Module) -> None:
        self.record_layer(i, write_layer_file(self.dir, i, layer))

    def record_layer(self, i: int, digest: str, row: dict | None = None) -> None:
        """Index a layer file written (atomically) by `write_layer_file`, possibly by another process;
        `row` (its losses) is kept so that a resumed run reports it."""
        self.meta.setdefault("checksums", {})[self._path(i).name] = digest
        self.meta["layers_done"] = sorted(set(self.meta["layers_done"]) | {i})
        if row is not None:
            self.meta.setdefault("layer_rows", {})[str(i)] = row
        atomic_write_text(self.dir / META, json.dumps(self.meta, indent=2) + "\n")

    def finish(self, report: list[dict], gptq: dict | None = None) -> None:
        self.meta["complete"] = True
        self.meta["report"] = report
        if gptq is not None:  # how the saved GPTQ weights were computed
            self.meta["gptq"] = gptq
        atomic_write_text(self.dir / META, json.dumps(self.meta, indent=2) + "\n")
