"""Zero-shot accuracy through lm-eval-harness, with the model passed as an object.

Offline (the default when ``<data_dir>/zeroshot`` exists): our task YAMLs in ``flatquant/eval/tasks``
``include`` the stock lm-eval task YAML (same prompt, choices, metrics; ``!function`` references
still resolve next to the stock file) and read the rows from local JSON-lines files. The templates
are filled in (absolute stock path, absolute data file) into a temporary folder that a
``lm_eval.tasks.TaskManager`` indexes.

Online fallback: with no data folder at all, and the hub reachable, the stock task names are used.

Metrics follow the paper (Table 2): acc_norm for ARC-C, ARC-E, HellaSwag and PIQA; acc for LAMBADA
and WinoGrande. Values are on a 0-100 scale.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from flatquant.data import ZEROSHOT_DIR, resolve_data_dir
from flatquant.errors import DataError, FlatQuantError

TEMPLATE_DIR = Path(__file__).resolve().parent / "tasks"

# task -> (stock YAML inside lm_eval/tasks, local data file in <data_dir>/zeroshot, metric)
ZEROSHOT_TASKS: dict[str, tuple[str, str, str]] = {
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge_test.jsonl.gz", "acc_norm"),
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy_test.jsonl.gz", "acc_norm"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag_validation.jsonl.gz", "acc_norm"),
    "lambada_openai": ("lambada/lambada_openai.yaml", "lambada_openai_test.jsonl.gz", "acc"),
    "piqa": ("piqa/piqa.yaml", "piqa_validation.jsonl.gz", "acc_norm"),
    "winogrande": ("winogrande/default.yaml", "winogrande_xl_validation.jsonl.gz", "acc"),
}
TASK_METRICS = {t: m for t, (_, _, m) in ZEROSHOT_TASKS.items()}
ALIASES = {"arc-c": "arc_challenge", "arc_c": "arc_challenge", "arc-e": "arc_easy", "arc_e": "arc_easy",
           "lambada": "lambada_openai", "winogrande_xl": "winogrande"}


def normalize_tasks(tasks) -> list[str]:
    """Canonical task names; FlatQuantError for an unknown one. Accepts a list or a comma string."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",")]
    out: list[str] = []
    for t in tasks:
        key = str(t).strip().lower()
        key = ALIASES.get(key, key)
        if key not in ZEROSHOT_TASKS:
            raise FlatQuantError(f"unknown zero-shot task {t!r}: supported tasks are {', '.join(ZEROSHOT_TASKS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise FlatQuantError(f"no zero-shot task given: supported tasks are {', '.join(ZEROSHOT_TASKS)}")
    return out


def stock_tasks_dir() -> Path:
    try:
        import lm_eval
    except ImportError:
        raise FlatQuantError("zero-shot evaluation needs lm-eval: pip install 'lm-eval>=0.4.8'") from None
    return Path(lm_eval.__file__).resolve().parent / "tasks"


def _zeroshot_data_dir(data_dir) -> Path | None:
    """<data_dir>/zeroshot when a data folder exists (explicit, env or ../shared/data), else None."""
    try:
        root = resolve_data_dir(data_dir)
    except DataError:
        if data_dir is not None:
            raise
        return None
    return root / ZEROSHOT_DIR


def write_task_configs(tasks: list[str], zs_dir: Path, out_dir: Path) -> dict[str, str]:
    """Fill in the templates for ``tasks`` under ``out_dir``; returns {task: lm-eval task name}.

    DataError when a task's data file is missing."""
    stock = stock_tasks_dir()
    names = {}
    for task in tasks:
        stock_rel, data_file, _ = ZEROSHOT_TASKS[task]
        data_path = (zs_dir / data_file).resolve()
        if not data_path.is_file():
            raise DataError(f"zero-shot task file not found: {data_path} (task {task})")
        stock_yaml = stock / stock_rel
        if not stock_yaml.is_file():
            raise FlatQuantError(f"the installed lm-eval has no {stock_rel} (looked in {stock})")
        template = (TEMPLATE_DIR / f"flatquant_{task}.yaml").read_text()
        lines = []
        for line in template.splitlines():
            if not line.lstrip().startswith("#"):
                # json.dumps gives a valid YAML double-quoted string for any path
                line = line.replace("@INCLUDE@", json.dumps(str(stock_yaml)))
                line = line.replace("@DATA_FILE@", json.dumps(str(data_path)))
            lines.append(line)
        (out_dir / f"flatquant_{task}.yaml").write_text("\n".join(lines) + "\n")
        names[task] = f"flatquant_{task}"
    return names


@contextlib.contextmanager
def _no_retie(model):
    """HFLM calls model.tie_weights(); a quantized model may have deliberately untied lm_head from the
    embeddings (transforms fused into one of them), so make that call a no-op while lm-eval runs."""
    had = "tie_weights" in vars(model)
    old = vars(model).get("tie_weights")
    try:
        model.tie_weights = lambda *a, **k: None
    except (AttributeError, TypeError):  # pragma: no cover
        yield
        return
    try:
        yield
    finally:
        if had:
            model.tie_weights = old
        else:
            with contextlib.suppress(AttributeError):
                del model.tie_weights


def _metric_value(task_result: dict, metric: str) -> float:
    for key in (f"{metric},none", metric):
        if key in task_result and task_result[key] is not None:
            return float(task_result[key])
    raise FlatQuantError(f"lm-eval returned no {metric!r} (got {sorted(task_result)})")


def _drop_model_object_notice(record: logging.LogRecord) -> bool:
    """lm-eval warns when given a model object instead of a name; passing one is what we mean to do."""
    return "`pretrained` model kwarg is not of type `str`" not in str(record.msg)


def evaluate_zeroshot(model, tokenizer, tasks: list[str], data_dir=None, limit: float | None = None,
                      batch_size: int = 32, device=None, seed: int = 1234) -> dict:
    """Zero-shot accuracy of ``model`` (a transformers causal LM object) on ``tasks``.

    Returns ``{task: {"metric", "value" (0-100), "n"}, ..., "average": mean of the values}``.
    ``limit`` caps the rows per task (lm-eval's ``--limit``).
    """
    tasks = normalize_tasks(tasks)
    stock_tasks_dir()  # clear error when lm-eval is missing
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    zs_dir = _zeroshot_data_dir(data_dir)
    offline = zs_dir is not None and zs_dir.is_dir()
    if zs_dir is not None and not offline and (data_dir is not None or os.environ.get("HF_DATASETS_OFFLINE") == "1"):
        raise DataError(f"zero-shot data folder not found: {zs_dir}")
    if device is not None:
        model.to(device)

    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("lm_eval.models.huggingface").addFilter(_drop_model_object_notice)

    with tempfile.TemporaryDirectory(prefix="flatquant-tasks-") as tmp, _no_retie(model):
        if offline:
            names = write_task_configs(tasks, zs_dir, Path(tmp))
            manager = TaskManager(include_path=tmp, include_defaults=False)
        else:  # pragma: no cover - needs network
            names = {t: t for t in tasks}
            manager = TaskManager()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(names.values()), limit=limit, task_manager=manager,
                                      batch_size=batch_size, log_samples=False, bootstrap_iters=0,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    if out is None:  # pragma: no cover - only non-zero ranks return None
        raise FlatQuantError("lm-eval returned no results")
    results = out["results"]
    n_samples = out.get("n-samples", {})
    report: dict = {}
    for task, lm_name in names.items():
        metric = TASK_METRICS[task]
        res = results.get(lm_name)
        if res is None:
            raise FlatQuantError(f"lm-eval returned no result for {lm_name}")
        ns = n_samples.get(lm_name, {})
        n = ns.get("effective", ns.get("original")) if isinstance(ns, dict) else None
        report[task] = {"metric": metric, "value": 100.0 * _metric_value(res, metric),
                        "n": int(n) if n is not None else None}
    report["average"] = sum(report[t]["value"] for t in names) / len(names)
    return report
