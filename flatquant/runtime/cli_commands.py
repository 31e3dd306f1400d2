"""`flatquant export` (saved FlatQuant parameters -> packed checkpoint) and `flatquant generate`."""
from __future__ import annotations

import argparse

import torch

from flatquant.errors import CheckpointError, FlatQuantError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def add_parsers(sub) -> dict:
    """Register the two subcommands; returns {name: handler}."""
    from flatquant.cli_help import _Help

    x = sub.add_parser("export", help="write a packed W4A4KV4 checkpoint from saved FlatQuant parameters",
                       formatter_class=_Help)
    x.add_argument("--params", required=True, help="folder saved by `flatquant quantize`")
    x.add_argument("--model", required=True, help="the model the parameters belong to (name, folder, .gguf)")
    x.add_argument("--output", required=True, help="checkpoint folder to write (replaced atomically)")
    x.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="embeddings, norms, lm_head")
    x.add_argument("--device", default="cpu", help="where the weights are folded (cpu is enough)")
    g = sub.add_parser("generate", help="generate text with a packed checkpoint", formatter_class=_Help)
    g.add_argument("--model", required=True, help="packed checkpoint folder (from `flatquant export`)")
    g.add_argument("--prompt", required=True, help="the text to continue (or the user message with --chat)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="how many tokens to generate (greedy)")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template, if it has one")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return {"export": cmd_export, "generate": cmd_generate}


def export_params(params: str, model_spec: str, output: str, dtype: torch.dtype = torch.float16,
                  device: str = "cpu") -> dict:
    """Load `model_spec`, apply the FlatQuant parameters in `params` (RTN or their saved GPTQ weights),
    and save the packed checkpoint; returns save_quantized's summary."""
    from flatquant.calib.artifacts import read_meta
    from flatquant.config import QuantConfig
    from flatquant.methods.flatquant import load_calibrated
    from flatquant.models.loading import load_model
    from flatquant.runtime.export import save_quantized

    meta = read_meta(params)
    if not meta.get("complete"):
        raise CheckpointError(f"--params {params}: the calibration there is unfinished")
    qcfg = QuantConfig.from_dict(meta["quant"])
    if (qcfg.w_bits, qcfg.a_bits, qcfg.kv_bits) != (4, 4, 4) or qcfg.w_bits_override or qcfg.a_bits_override:
        raise CheckpointError(f"--params {params}: {qcfg.tag} with per-projection bits "
                              f"{qcfg.w_bits_override or qcfg.a_bits_override or 'none'}; the packed format "
                              "holds W4A4KV4 only")
    if qcfg.weight_quantizer == "gptq" and "gptq" not in meta:
        qcfg = QuantConfig.from_dict({**meta["quant"], "weight_quantizer": "rtn"})
    model, tok = load_model(model_spec, device=device, dtype=dtype)
    load_calibrated(model, params, qcfg)
    return save_quantized(model, output, tokenizer=tok, dtype=dtype)


def cmd_export(args: argparse.Namespace) -> int:
    info = export_params(args.params, args.model, args.output, DTYPES[args.dtype], args.device)
    ratio = info["bytes_packed"] / info["bytes_fp16"]
    print(f"wrote {info['path']}: {info['bytes_packed'] / 2**20:.1f} MiB of safetensors "
          f"({ratio:.1%} of the 16-bit model's {info['bytes_fp16'] / 2**20:.1f} MiB)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer, TextStreamer
    from transformers.utils import logging as hf_logging

    from flatquant.runtime.load import load_quantized

    if args.max_new_tokens < 1:
        raise FlatQuantError("--max-new-tokens must be at least 1")
    hf_logging.disable_progress_bar()  # the output is the generated text
    model = load_quantized(args.model, device=args.device)
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{args.model}: no usable tokenizer files ({type(e).__name__})") from e
    device = next(model.parameters()).device
    if args.chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                       max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer,
                       pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return 0
