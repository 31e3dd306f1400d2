"""Perplexity with the GPTQ / QuaRot / FlatQuant protocol.

The token stream (1, N) is cut into ``N // seqlen`` consecutive, non-overlapping windows (the tail is
dropped). Each window is scored on its own (no context carried over) with next-token cross-entropy on
positions 1..seqlen-1; the window NLL is the mean over those positions, and

    ppl = exp( sum_w nll_w * seqlen / (nwin * seqlen) ) = exp(mean_w nll_w)

which is the formula of the reference implementations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flatquant.errors import DataError


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _window_nll(logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean next-token NLL per window, float32, computed a few windows at a time so the float32 copy
    of the logits never covers the whole batch. logits (B, L, V), targets (B, L) -> (B,)."""
    out = []
    for i in range(0, logits.shape[0], chunk):
        lg = logits[i: i + chunk, :-1, :].float()
        tg = targets[i: i + chunk, 1:]
        loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), reduction="none")
        out.append(loss.view(tg.shape).mean(dim=1))
    return torch.cat(out)


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               batch_size: int = 8, device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``input_ids`` (1, N) over ``N // seqlen`` windows of ``seqlen`` tokens.

    Returns ``dict(ppl, nll, windows, tokens, seqlen, max_windows)``; ``tokens`` = windows * seqlen.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise DataError(f"input_ids must have shape (1, N), got {tuple(input_ids.shape)}")
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}")
    n_tokens = input_ids.shape[1]
    nwin = n_tokens // seqlen
    if nwin == 0:
        raise DataError(f"text has {n_tokens} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        if max_windows < 1:
            raise DataError(f"max_windows must be positive, got {max_windows}")
        nwin = min(nwin, int(max_windows))
    batch_size = max(1, int(batch_size))
    dev = torch.device(device) if device is not None else _model_device(model)

    windows = input_ids[0, : nwin * seqlen].reshape(nwin, seqlen).long()
    was_training = getattr(model, "training", False)
    model.eval()
    # ~256 MB of float32 logits per chunk for a 32k-vocab, 2048-token window; at least one window.
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 32000
    chunk = max(1, int(256 * 2**20 // (4 * vocab * seqlen)))

    nll_sum = 0.0  # float64 accumulation over windows
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=nwin, desc=f"ppl (seqlen {seqlen})", unit="win", disable=not progress) if tqdm else None
    try:
        for start in range(0, nwin, batch_size):
            batch = windows[start: start + batch_size].to(dev)
            out = model(input_ids=batch, use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]
            nll = _window_nll(logits, batch, chunk)
            if not torch.isfinite(nll).all():
                nll_sum = float("nan")
            else:
                nll_sum += float(nll.double().sum().item())
            del out, logits
            if bar is not None:
                bar.update(batch.shape[0])
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()

    mean_nll = nll_sum / nwin
    ppl = math.exp(mean_nll) if math.isfinite(mean_nll) and mean_nll < 700 else float("inf")
    if math.isnan(mean_nll):
        ppl = float("nan")
    return {"ppl": ppl, "nll": mean_nll, "windows": nwin, "tokens": nwin * seqlen, "seqlen": seqlen,
            "max_windows": max_windows}
