"""The packed W4A4KV4 model on one GPU: parity with the fake-quant model, checkpoint size, memory.

From saved FlatQuant parameters (default: checks/smollm2-w4a4kv4-paper-params on smollm2-135m):
  1. export the packed checkpoint (temporary folder) and load it on the device (flatquant.load_quantized);
  2. WikiText-2 perplexity of the packed model and of the fake-quant model with the same parameters
     (records like the ppl records, with "runtime": "packed" / "fake-quant");
  3. greedy continuations of 5 fixed prompts (32 new tokens), packed vs fake-quant: where they part;
  4. memory: the loaded model vs the 16-bit model, and a Llama-2-7B-shaped stack of --stack-layers
     decoder layers (random weights) vs 16-bit, extrapolated per layer to 32 layers;
  5. a checkpoint record: bytes of the safetensors files vs the 16-bit model;
  6. noise: the fake-quant model in a second precision (float32 on CUDA, float64 on the CPU) against the first,
     perplexity and where greedy continuations part. 4-bit quantizers turn float round-off into whole-step
     flips, so two exact-in-theory computations differ; this part measures how much, for the packed gap.
Records are JSON files under --out-dir (flatquant.results.write_record). --smoke runs every part on a
tiny random model on the CPU (a test does), calibrated with the tiny preset.

GPU (about 2-3 minutes on an H100, most of it Triton compilation):
  python benchmarks/runtime/runtime_gpu.py --out-dir $OUT/results
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import flatquant
from flatquant.results import write_record
from flatquant.runtime.kvcache import set_runtime_backend

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "The three primary colors are", "To make a cup of tea, first",
           "def fibonacci(n):"]
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True)
SMOKE_TEXT = ("The quick brown fox jumps over the lazy dog. Quantization maps floating point numbers to a small "
              "set of integers. A Kronecker product of two small matrices is cheap to apply. ") * 4


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _allocated(device) -> int | None:
    if torch.device(device).type != "cuda":
        return None
    _sync(device)
    return torch.cuda.memory_allocated()


def tensor_bytes(model) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:  # tied weights are one tensor
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


# ------------------------------------------------------------------------------------- models ---

def smoke_setup(work: Path):
    """A tiny Llama folder with a byte-level BPE tokenizer, and FlatQuant parameters (tiny preset)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from flatquant import QuantConfig, calib_preset, quantize

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([SMOKE_TEXT], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, num_hidden_layers=2, vocab_size=len(tok))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
    model_dir, params = work / "tiny-model", work / "tiny-params"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    ids = tok(SMOKE_TEXT, return_tensors="pt")["input_ids"][0]
    calib = torch.stack([ids[i * 32:(i + 1) * 32] for i in range(4)])
    quantize(model, QuantConfig(4, 4, 4), method="flatquant", calib=calib, calib_config=calib_preset("tiny"),
             artifacts=str(params), progress=False)
    return str(model_dir), str(params)


def fake_quant_model(model_spec: str, params: str, device, dtype):
    from flatquant.methods.flatquant import load_calibrated
    from flatquant.models.loading import load_model

    model, tok = load_model(model_spec, device=device, dtype=dtype)
    load_calibrated(model, params)
    return model, tok


# -------------------------------------------------------------------------------------- parts ---

def part_ppl(base: dict, fake, packed, tok, args, runtimes=("fake-quant", "packed")) -> list[dict]:
    from flatquant import data as data_mod
    from flatquant.eval.perplexity import perplexity

    ids = data_mod.eval_tokens(tok, "wikitext2", data_dir=args.data_dir, seqlen=args.seqlen)
    recs = []
    for runtime, model in zip(runtimes, (fake, packed)):
        t = time.time()
        res = perplexity(model, ids, seqlen=args.seqlen, max_windows=args.max_windows, batch_size=args.batch_size,
                         device=args.device, progress=False)
        recs.append({**base, "kind": "ppl", "dataset": "wikitext2", "seqlen": args.seqlen, "windows": res["windows"],
                     "max_windows": args.max_windows, "ppl": res["ppl"], "runtime": runtime,
                     "variant": f"{args.variant}-{runtime}", "eval_seconds": round(time.time() - t, 2)})
    recs[1]["ppl_vs_fake_quant"] = recs[1]["ppl"] / recs[0]["ppl"] - 1.0
    recs[1]["fake_quant_ppl"] = recs[0]["ppl"]
    return recs


def part_generation(base: dict, fake, packed, tok, args, names=("fake_quant", "packed")) -> dict:
    rows = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"].to(args.device)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False,
                  min_new_tokens=args.new_tokens, use_cache=True,
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        with torch.no_grad():
            a = fake.generate(ids, **kw)[0, ids.shape[1]:].tolist()
            b = packed.generate(ids, **kw)[0, ids.shape[1]:].tolist()
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        rows.append({"prompt": prompt, f"{names[0]}_tokens": a, f"{names[1]}_tokens": b, "first_difference": first,
                     "agree": sum(x == y for x, y in zip(a, b)), f"{names[0]}_text": tok.decode(a),
                     f"{names[1]}_text": tok.decode(b)})
    return {**base, "kind": "generation", "variant": args.variant, "new_tokens": args.new_tokens, "prompts": rows,
            "identical_prompts": sum(r["first_difference"] is None for r in rows)}


def part_noise(base: dict, fake, tok, args) -> list[dict]:
    """The fake-quant model in a second precision vs the first: the numerical noise of the same parameters."""
    dev = torch.device(args.device)
    other = torch.float32 if dev.type == "cuda" else torch.float64
    fake2, _ = fake_quant_model(args.model, args.params, args.device, other)
    fake2.config.use_cache = True
    name = str(other).split(".")[-1]
    ppl = part_ppl(base, fake, fake2, tok, args, runtimes=("fake-quant", f"fake-quant-{name}"))
    gen = part_generation(base, fake, fake2, tok, args, names=("fake_quant", f"fake_quant_{name}"))
    gen["variant"] = f"{args.variant}-noise-{name}"
    del fake2
    return [ppl[1], gen]


def part_model_memory(base: dict, args, ckpt: Path, packed) -> dict:
    from flatquant.models.loading import load_model

    rec = {**base, "kind": "memory", "variant": f"{args.variant}-loaded", "packed_tensor_bytes": tensor_bytes(packed)}
    dev = torch.device(args.device)
    before = _allocated(dev)
    fp16, _ = load_model(args.model, device=args.device, dtype=torch.float16 if dev.type == "cuda" else None)
    rec["fp16_tensor_bytes"] = tensor_bytes(fp16)
    if before is not None:
        rec["fp16_allocated_bytes"] = _allocated(dev) - before
    del fp16
    if before is not None:
        torch.cuda.empty_cache()
        before = _allocated(dev)
        again = flatquant.load_quantized(ckpt, device=dev)
        set_runtime_backend(again, args.backend)
        rec["packed_allocated_bytes"] = _allocated(dev) - before
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            again(torch.ones(1, 256, dtype=torch.long, device=dev))
        rec["packed_allocated_after_forward_bytes"] = _allocated(dev) - before  # + cached one-byte weight codes
        del again
        torch.cuda.empty_cache()
    return rec


def _random_fill(model) -> None:
    from flatquant.kernels.linear import W4A4Linear
    from flatquant.runtime.modules import PackedKV

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, W4A4Linear):
                m.qweight.copy_(torch.randint(0, 256, m.qweight.shape, dtype=torch.uint8, device=m.qweight.device))
                m.weight_scale.fill_(0.02 / 7)
                m.alpha.fill_(0.9)
                if m.bias is not None:
                    m.bias.zero_()
                for p in (m.p1, m.p2):
                    if p is not None:
                        p.copy_(torch.linalg.qr(torch.randn(p.shape, device=p.device))[0])
            elif isinstance(m, PackedKV):
                for name in ("key_p1", "key_p2", "query_p1", "query_p2"):
                    p = getattr(m, name)
                    if p is not None:
                        p.copy_(torch.eye(p.shape[0], device=p.device))
                m.k_clip.fill_(1.0)
                m.v_clip.fill_(1.0)
            else:
                for name, p in m.named_parameters(recurse=False):
                    p.copy_(torch.ones_like(p) if "norm" in type(m).__name__.lower() else torch.randn_like(p) * 0.02)


def part_stack_memory(base: dict, args) -> dict:
    """A Llama-2-7B-shaped model with a few layers: packed vs 16-bit bytes, extrapolated to 32 layers."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from flatquant.core.transforms import kron_factors
    from flatquant.runtime.export import skeleton
    from flatquant.runtime.kvcache import install_runtime
    from flatquant.runtime.layout import quant_block

    shape = {**TINY, "vocab_size": 320} if args.smoke else LLAMA2_7B
    full_layers = 2 if args.smoke else 32
    dev = torch.device(args.device)
    dt = torch.float16 if dev.type == "cuda" else torch.float32
    out = {**base, "kind": "memory", "variant": "llama2-7b-shape" if not args.smoke else "tiny-shape",
           "shape": shape, "stack_layers": {}, "full_layers": full_layers}
    for n in (1, args.stack_layers):
        cfg = LlamaConfig(**shape, num_hidden_layers=n)
        hidden, heads = shape["hidden_size"], shape["num_attention_heads"]
        d = hidden // heads
        f = lambda k: dict(zip(("p1", "p2"), kron_factors(k)))
        sites = {"attn_in": f(hidden), "o_in": {"p1": heads, "p2": None}, "mlp_in": f(hidden),
                 "down_in": f(shape["intermediate_size"])}
        block = quant_block(4, 4, 4, d, sites, {"p1": None, "p2": d}, str(dt).split(".")[-1])
        conf = {**cfg.to_dict(), "quantization_config": block}
        before = _allocated(dev)
        packed = skeleton(conf).to_empty(device=dev)
        _random_fill(packed)
        packed.model.rotary_emb = type(packed.model.rotary_emb)(config=packed.config).to(dev)
        install_runtime(packed)
        row = {"packed_tensor_bytes": tensor_bytes(packed)}
        if before is not None:
            row["packed_allocated_bytes"] = _allocated(dev) - before
        with torch.no_grad():
            packed.generate(torch.ones(1, 64, dtype=torch.long, device=dev), max_new_tokens=4, do_sample=False,
                            min_new_tokens=4)
        del packed
        if before is not None:
            torch.cuda.empty_cache()
        with torch.device("meta"):
            ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
        row["fp16_tensor_bytes"] = tensor_bytes(ref)
        out["stack_layers"][str(n)] = row
    one, many = out["stack_layers"]["1"], out["stack_layers"][str(args.stack_layers)]
    for key in ("packed_tensor_bytes", "fp16_tensor_bytes"):
        per_layer = (many[key] - one[key]) / max(args.stack_layers - 1, 1)
        out[f"{key}_per_layer"] = per_layer
        out[f"{key}_{full_layers}_layers"] = one[key] + per_layer * (full_layers - 1)
    out["packed_vs_fp16_per_layer"] = out["packed_tensor_bytes_per_layer"] / out["fp16_tensor_bytes_per_layer"]
    return out


# --------------------------------------------------------------------------------------- main ---

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model-name", default="SmolLM2-135M-Instruct")
    ap.add_argument("--params", default=str(Path(__file__).resolve().parents[2] / "checks" /
                                            "smollm2-w4a4kv4-paper-params"))
    ap.add_argument("--variant", default="paper-recipe")
    ap.add_argument("--out-dir", default="results/runtime")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--stack-layers", type=int, default=4)
    ap.add_argument("--parts", default="ppl,generation,noise,memory,stack")
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                    help="kernels of the packed model (auto: Triton on CUDA)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model on the CPU (for the test)")
    args = ap.parse_args(argv)
    parts = set(filter(None, args.parts.split(",")))
    work = Path(tempfile.mkdtemp(prefix="fq-runtime-"))
    failures = 0
    try:
        if args.smoke:
            args.model, args.params = smoke_setup(work)
            args.model_name, args.variant, args.device = "tiny-llama", "smoke", "cpu"
            args.seqlen, args.max_windows, args.new_tokens, args.stack_layers = 64, 2, 8, 2
        dev = torch.device(args.device)
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        fake, tok = fake_quant_model(args.model, args.params, args.device, dtype)
        fake.config.use_cache = True
        base = {"model": args.model_name, "method": "flatquant", "w_bits": 4, "a_bits": 4, "kv_bits": 4,
                "weight_quantizer": "rtn", "params": str(args.params)}
        ckpt = work / "packed"
        t = time.time()
        info = flatquant.save_quantized(fake, ckpt, tokenizer=tok, dtype=dtype)
        export_s = time.time() - t
        write_record({**base, "kind": "checkpoint", "variant": args.variant, "bytes_packed": info["bytes_packed"],
                      "bytes_fp16": info["bytes_fp16"], "ratio": info["bytes_packed"] / info["bytes_fp16"],
                      "export_seconds": round(export_s, 2)}, args.out_dir)
        packed = flatquant.load_quantized(ckpt, device=dev)
        set_runtime_backend(packed, args.backend)
        base["backend"] = args.backend
        jobs = [("ppl", lambda: part_ppl(base, fake, packed, tok, args)),
                ("generation", lambda: [part_generation(base, fake, packed, tok, args)]),
                ("noise", lambda: part_noise(base, fake, tok, args)),
                ("memory", lambda: [part_model_memory(base, args, ckpt, packed)]),
                ("stack", lambda: [part_stack_memory({k: base[k] for k in ("method", "w_bits", "a_bits", "kv_bits")}
                                                     | {"model": "Llama-2-7B-shape"}, args)])]
        for name, job in jobs:
            if name not in parts:
                continue
            t = time.time()
            try:
                for rec in job():
                    path = write_record({**rec, "part_seconds": round(time.time() - t, 2)}, args.out_dir)
                    print(f"[{name}] wrote {path}")
            except Exception:  # one part failing still leaves the others' records
                failures += 1
                traceback.print_exc()
                write_record({"kind": "runtime-error", "model": args.model_name, "variant": f"{args.variant}-{name}",
                              "error": traceback.format_exc()[-2000:]}, args.out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
