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

HEAD_CHUNK_BYTES = 32 << 20  # float32 logits per output-head chunk: half of 64 MB, as fast on a CPU


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


def _head_nll(model, batch: torch.Tensor, positions: int) -> torch.Tensor | None:
    """Mean next-token NLL per window (B,) from the decoder's hidden states, with the output head applied
    `positions` positions at a time, so no (B, L, V) logits tensor exists. None when the model does not
    expose the standard decoder / output-embedding split (the caller then uses the full logits)."""
    get_dec, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    decoder = get_dec() if callable(get_dec) else None
    head = get_head() if callable(get_head) else None
    if decoder is None or head is None or decoder is model or getattr(model.config, "final_logit_softcapping", None):
        return None
    hidden = decoder(input_ids=batch, use_cache=False)[0]  # (B, L, H), final norm applied
    total = torch.zeros(batch.shape[0], dtype=torch.float32, device=hidden.device)
    for s in range(0, batch.shape[1] - 1, positions):
        e = min(s + positions, batch.shape[1] - 1)
        lg = head(hidden[:, s:e]).float()
        tg = batch[:, s + 1:e + 1]
        total += F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), reduction="none").view(tg.shape).sum(1)
    return total / (batch.shape[1] - 1)


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               batch_size: int = 8, device: str | torch.device | None = None, progress: bool = True,
               desc: str | None = None) -> dict:
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
    bar = tqdm(total=nwin, desc=desc or f"ppl (seqlen {seqlen})", unit="win", disable=not progress) if tqdm else None
    try:
        for start in range(0, nwin, batch_size):
            batch = windows[start: start + batch_size].to(dev)
            nll = _head_nll(model, batch, max(1, HEAD_CHUNK_BYTES // (4 * vocab * batch.shape[0])))
            if nll is None:
                out = model(input_ids=batch, use_cache=False)
                logits = out.logits if hasattr(out, "logits") else out[0]
                nll = _window_nll(logits, batch, chunk)
                del out, logits
            if not torch.isfinite(nll).all():
                nll_sum = float("nan")
            else:
                nll_sum += float(nll.double().sum().item())
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
