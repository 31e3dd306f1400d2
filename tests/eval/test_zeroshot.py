"""Zero-shot through lm-eval-harness with our offline task YAMLs (flatquant.eval.zeroshot)."""
from __future__ import annotations

import shutil

import pytest
import torch

from flatquant.errors import DataError, FlatQuantError

lm_eval = pytest.importorskip("lm_eval")

from flatquant.eval import zeroshot

ALL_TASKS = list(zeroshot.ZEROSHOT_TASKS)


def test_task_templates_exist():
    for task in ALL_TASKS:
        text = (zeroshot.TEMPLATE_DIR / f"flatquant_{task}.yaml").read_text()
        assert f"task: flatquant_{task}" in text and "@INCLUDE@" in text and "@DATA_FILE@" in text
        stock_rel = zeroshot.ZEROSHOT_TASKS[task][0]
        assert (zeroshot.stock_tasks_dir() / stock_rel).is_file(), stock_rel


def test_metrics_follow_the_paper():
    assert zeroshot.TASK_METRICS == {"arc_challenge": "acc_norm", "arc_easy": "acc_norm", "hellaswag": "acc_norm",
                                     "lambada_openai": "acc", "piqa": "acc_norm", "winogrande": "acc"}


def test_unknown_task(tiny_model_factory, tiny_tokenizer):
    with pytest.raises(FlatQuantError, match="supported tasks are arc_challenge"):
        zeroshot.evaluate_zeroshot(tiny_model_factory("llama"), tiny_tokenizer, ["mmlu"], data_dir=".")
    assert zeroshot.normalize_tasks("arc-c,lambada") == ["arc_challenge", "lambada_openai"]


def test_missing_task_file(tmp_path, tiny_model_factory, tiny_tokenizer, shared_data_dir):
    zs = tmp_path / "zeroshot"
    zs.mkdir()
    if shared_data_dir is not None:
        shutil.copy(shared_data_dir / "zeroshot" / "piqa_validation.jsonl.gz", zs)
    with pytest.raises(DataError, match="winogrande_xl_validation.jsonl.gz"):
        zeroshot.evaluate_zeroshot(tiny_model_factory("llama"), tiny_tokenizer, ["piqa", "winogrande"],
                                   data_dir=tmp_path, limit=2)


def test_configs_resolve(tmp_path, shared_data_dir):
    """The generated YAMLs load through lm-eval's TaskManager: stock prompts, local data, !function refs."""
    if shared_data_dir is None:
        pytest.skip("../shared/data not present")
    from lm_eval.tasks import TaskManager

    out = tmp_path / "tasks"
    out.mkdir()
    names = zeroshot.write_task_configs(ALL_TASKS, shared_data_dir / "zeroshot", out)
    tm = TaskManager(include_path=str(out), include_defaults=False)
    loaded = tm.load([names["hellaswag"], names["winogrande"]])
    flat = loaded["tasks"] if isinstance(loaded, dict) and "tasks" in loaded else loaded
    assert flat  # both built without touching the network


def test_six_tasks_on_tiny_model(tiny_model_factory, tiny_tokenizer, shared_data_dir, monkeypatch, caplog):
    if shared_data_dir is None:
        pytest.skip("../shared/data not present")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_model_factory("llama")
    # a quantized model may untie lm_head from the embeddings on purpose: lm-eval must not re-tie it
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 1.5)
    lm_head = model.lm_head.weight
    res = zeroshot.evaluate_zeroshot(model, tiny_tokenizer, ALL_TASKS, data_dir=shared_data_dir, limit=3,
                                     batch_size=8)
    assert set(res) == set(ALL_TASKS) | {"average"}
    for task in ALL_TASKS:
        r = res[task]
        assert r["metric"] == zeroshot.TASK_METRICS[task]
        assert r["n"] == 3
        assert 0.0 <= r["value"] <= 100.0
    assert res["average"] == pytest.approx(sum(res[t]["value"] for t in ALL_TASKS) / 6)
    assert model.lm_head.weight is lm_head  # lm-eval's tie_weights() call was neutralised
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert "tie_weights" not in vars(model)
    assert "`pretrained` model kwarg" not in caplog.text  # lm-eval's model-object notice is filtered
