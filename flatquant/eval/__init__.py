"""Evaluation: WikiText-2 / C4 perplexity and zero-shot accuracy through lm-eval-harness.

``perplexity`` has no extra dependencies; ``evaluate_zeroshot`` imports lm-eval only when called.
"""
from flatquant.eval.perplexity import perplexity

__all__ = ["ZEROSHOT_TASKS", "evaluate_zeroshot", "perplexity"]


def __getattr__(name):
    if name in ("evaluate_zeroshot", "ZEROSHOT_TASKS", "TASK_METRICS"):
        from flatquant.eval import zeroshot

        return getattr(zeroshot, name)
    raise AttributeError(name)
