"""Command-line options for the quantizer settings beyond the bit widths (groups, K/V bits, mixed precision)
and the calibration recipe's accuracy knobs; `flatquant quantize` and `flatquant eval` share them."""
from __future__ import annotations

import argparse

from flatquant import mixed

MIXED_HELP = ("per-layer / per-projection mixed precision: clauses 'layers=0,1,29:w8a8' (bits of those layers), "
              "'down_proj=w8a8' (bits of those projections), 'layers=0-3:down_proj=w8', 'layers=0:kv8', joined "
              "by ';' (later clauses win). Bits: wN aN kN vN kvN, or a bare N = wNaN. Or a .json file: a list of "
              "{\"layers\": [...], \"proj\": [...], \"w\": N, \"a\": N, \"k\": N, \"v\": N}. k_proj/v_proj share "
              "q_proj's input quantizer and up_proj gate_proj's: their activation bits must match (else an error); "
              "an unknown projection or layer is an error (default: none)")


def add_settings_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--w-group-size", type=int, default=None,
                   help="quantize weights in groups of this many input channels, one scale (and zero) per group "
                        "(RTN and GPTQ, with or without act order; default: one group per output channel)")
    p.add_argument("--w-asym", action=argparse.BooleanOptionalAction, default=None,
                   help="asymmetric weights (a zero point per row or group; default: symmetric)")
    p.add_argument("--k-bits", type=int, default=None, help="key-cache bits, 2-16 (default: --kv-bits)")
    p.add_argument("--v-bits", type=int, default=None, help="value-cache bits, 2-16 (default: --kv-bits)")
    p.add_argument("--kv-group-size", type=int, default=None,
                   help="asymmetric KV quantization per token in groups of this many channels within a head; "
                        "must divide the head dimension (default: one group per head, i.e. head_dim channels)")
    p.add_argument("--mixed", default=None, metavar="SPEC|FILE.json", help=MIXED_HELP)
    p.add_argument("--gptq-act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize columns by decreasing Hessian diagonal (default: on)")
    g = p.add_argument_group("calibration accuracy knobs (FlatQuant)")
    g.add_argument("--scale-alpha", type=float, default=None,
                   help="initial channel scales max|X|^a / max|W|^(1-a), a in [0, 1] (default: 0.5; the "
                        "reference implementation uses 0.3)")
    g.add_argument("--kv-clip-split", action=argparse.BooleanOptionalAction, default=None,
                   help="learn separate lower and upper clip factors for the asymmetric KV quantizer "
                        "(default: off, one factor for both)")
    g.add_argument("--calib-loss", default=None, choices=["mse", "nmse-token"],
                   help="calibration loss: mse over all outputs, or nmse-token (each token's squared error over "
                        "its target's mean square, so a few huge tokens do not dominate; default: mse)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="AdamW weight decay of the transforms and clip factors (default: 0)")


def quant_settings(args) -> dict:
    """QuantConfig keyword arguments from the options (None = the method's default)."""
    spec = mixed.load_spec(args.mixed) if args.mixed is not None else None
    return dict(w_group_size=args.w_group_size, w_asym=args.w_asym, k_bits=args.k_bits, v_bits=args.v_bits,
                kv_group_size=args.kv_group_size, mixed=spec, gptq_act_order=args.gptq_act_order)


def calib_overrides(args) -> dict:
    """CalibConfig keyword arguments the options set."""
    found = {"scale_alpha": args.scale_alpha, "kv_clip_split": args.kv_clip_split, "loss": args.calib_loss,
             "weight_decay": args.weight_decay}
    return {k: v for k, v in found.items() if v is not None}
