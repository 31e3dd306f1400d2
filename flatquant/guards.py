"""Checks the CLI runs around saved parameters and results, so a mismatch is one clear line, early.

- `precheck_params`: saved parameters fit the model, judged from its config.json (or GGUF metadata)
  before any weight is loaded.
- `stamp_fingerprint` / `check_fingerprint`: a calibration folder records the model it was calibrated on,
  and resuming or reusing it on another model (same shapes, other weights) is refused.
- `params_note`: the record fields (and message) saying which bits saved parameters were trained at.
- `summary_lines`: the closing summary of `flatquant quantize` / `eval`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from flatquant.calib import artifacts
from flatquant.calib.integrity import atomic_write_bytes, model_fingerprint
from flatquant.errors import CheckpointError, NonFiniteError


def precheck_params(folders: list[Path], model_spec: str) -> None:
    """CheckpointError when a parameter folder in `folders` (those holding flatquant.json) does not fit
    the sizes of `model_spec`, read from its configuration only."""
    metas = [(f, artifacts.read_meta(f)) for f in folders if (Path(f) / artifacts.META).is_file()]
    metas = [(f, m) for f, m in metas if isinstance(m.get("sizes"), dict)]
    if not metas:
        return
    from flatquant.models.loading import load_config

    config = load_config(model_spec)
    for folder, meta in metas:
        try:
            artifacts.check_model_matches(meta, config)
        except CheckpointError as e:
            raise CheckpointError(f"{folder}: {e}") from None


def check_fingerprint(folder: Path, model, what: str = "resume") -> str:
    """The model's fingerprint; CheckpointError when `folder` was calibrated on a different model."""
    fp = model_fingerprint(model)
    saved = artifacts.read_meta(folder).get("model_fingerprint")
    if saved and saved != fp:
        hint = ("use --no-resume to recalibrate it, or another --output" if what == "resume"
                else "pass the model it was calibrated on")
        raise CheckpointError(f"{folder} was calibrated on a different model (fingerprint {saved}, this model "
                              f"{fp}); {hint}")
    return fp


def stamp_fingerprint(folder: Path, model, qcfg, ccfg) -> None:
    """Start a calibration folder whose flatquant.json names the model (kept as layers are saved)."""
    store = artifacts.LayerStore(folder, model.config, qcfg, ccfg)
    store.meta["model_fingerprint"] = model_fingerprint(model)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / artifacts.META, (json.dumps(store.meta, indent=2) + "\n").encode())


def bits_tag(q: dict) -> str:
    return f"W{q.get('w_bits')}A{q.get('a_bits')}KV{q.get('kv_bits')}"


def params_note(folder: str | Path, qcfg, model) -> tuple[dict, str | None]:
    """(record fields, message or None) for evaluating saved parameters: the bits they were trained at and
    the fingerprint of the model they were calibrated on; a message when either differs from this run."""
    meta = artifacts.read_meta(folder)
    trained = bits_tag(meta.get("quant", {}))
    now = bits_tag(qcfg.to_dict())
    saved_fp, fp = meta.get("model_fingerprint"), model_fingerprint(model)
    fields = {"params_trained_bits": trained, "params_model_fingerprint": saved_fp or "unknown",
              "model_fingerprint": fp}
    notes = []
    if trained != now:
        notes.append(f"the parameters in {folder} were trained at {trained} and are evaluated at {now}")
    if saved_fp and saved_fp != fp:
        notes.append(f"they were calibrated on a different model (fingerprint {saved_fp}, this model {fp})")
    return fields, ("note: " + "; ".join(notes)) if notes else None


def check_finite_ppl(method: str, dataset: str, ppl: float) -> None:
    if not math.isfinite(ppl):
        raise NonFiniteError(f"{method}: perplexity on {dataset} is {ppl} (the model produced NaN/inf logits); "
                             "no record was written")


def summary_lines(records: list[dict], results_dir: str | None, full_windows: dict | None = None) -> list[str]:
    """What the closing table shows, and where its records went."""
    out = []
    ppl = [r for r in records if r.get("kind") == "ppl"]
    if ppl:
        wins = sorted({r["windows"] for r in ppl})
        out.append(f"Perplexity: lower is better. Each number is over {', '.join(map(str, wins))} window(s) of "
                   f"{ppl[0]['seqlen']} tokens" + (" (a quick preset's cap: not comparable with docs/RESULTS.md, "
                                                   "which uses every window)" if any(r.get("max_windows") for r in ppl)
                                                   else "") + ".")
    if any(r.get("kind") == "zeroshot" for r in records):
        out.append("Zero-shot: accuracy in %, higher is better.")
    if results_dir:
        out.append(f"{len(records)} JSON record(s) written to {results_dir}/ (`flatquant report --results-dir "
                   f"{results_dir} --out {results_dir}/RESULTS.md --plots-dir {results_dir}/plots` renders them).")
    else:
        out.append("No records written (--results-dir '').")
    return out
