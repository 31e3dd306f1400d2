"""The paper's other settings (Tables 11-15) and the accuracy variants, one ppl record per row and dataset.

Rows (method, bits, settings), run cheapest first (estimates below are rough H100 figures for SmolLM2-135M:
a FlatQuant paper-recipe calibration ~161 s, RTN/QuaRot a few seconds, evaluation ~3 s per dataset):
  11  weight-only W4A16 / W3A16: RTN, GPTQ, GPTQ-g<--w-group-size>, QuaRot, FlatQuant-RTN, FlatQuant-GPTQ
  12  KV-only, K/V bits in {2,3,4}^2, asymmetric per token in groups of --kv-group-size channels within a
      head: QuaRot and FlatQuant (trained at those bits). The paper's groups of 128 are LLaMA's whole head
      (head_dim 128); SmolLM2's head_dim is 64, so by default a group is the whole head: 64 channels
  13  the diagonal of 12 (K = V bits), QuaRot vs FlatQuant (the same rows, shared)
  14  W3A3KV3 (and W4A4KV4): QuaRot vs FlatQuant, with zero-shot (--tasks)
  15  FlatQuant calibrated once at W4A4KV4, evaluated at W4A16KV16, W16A4KV16, W16A16KV4 and W4A4KV4
      (records carry trained_bits "W4A4KV4"), with zero-shot
  variants (--variants): FlatQuant W4A4KV4 + GPTQ with one accuracy knob changed each (variant "acc-<name>"):
      alpha0.3 (channel-scale init alpha), kvsplit (separate lower/upper KV clip), nmse (per-token normalised
      loss), wd (weight decay), ref (alpha 0.3 + kvsplit), and "base" (the defaults) to compare against;
      pick by the C4 proxy, not by WikiText-2.
Every record is written by flatquant.runner.run_config (the code behind `flatquant quantize`); FlatQuant
parameters go to <out-dir>/params/<name> and are reused when a run is repeated. --max-seconds stops starting
new rows once that much wall time has passed; --dry-run prints the plan only; --smoke is a tiny CPU run.
Example (GPU):
  python benchmarks/accuracy/run_settings.py --model smollm2-135m --out-dir out/settings --tables 11,12,13,14,15 \
      --variants base,alpha0.3,kvsplit,nmse,wd,ref --max-seconds 3000
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flatquant.config import CalibConfig, calib_preset, method_config

TASKS = ["arc_challenge", "arc_easy", "hellaswag", "lambada_openai", "piqa", "winogrande"]
SMOKE = dict(nsamples=2, seqlen=32, epochs=1, batch_size=2)
# Rough H100 seconds per piece of work (planning only; the records hold the measured times).
EST = {"fast": 3.0, "gptq": 30.0, "calib": 161.0, "ppl": 3.0, "zeroshot": 120.0, "load": 5.0}
VARIANTS = {"base": {}, "alpha0.3": {"scale_alpha": 0.3}, "kvsplit": {"kv_clip_split": True},
            "nmse": {"loss": "nmse-token"}, "wd": {"weight_decay": 1e-4},
            "ref": {"scale_alpha": 0.3, "kv_clip_split": True}}


@dataclass
class Row:
    tables: list[str]
    method: str
    bits: tuple[int, int, int, int]  # w, a, k, v
    settings: dict = field(default_factory=dict)  # QuantConfig extras (weight_quantizer, w_group_size, ...)
    params: str | None = None  # FlatQuant: parameter folder name (shared by the rows evaluated from it)
    train_bits: tuple[int, int, int, int] | None = None  # FlatQuant: the bits the parameters are trained at
    calib: dict = field(default_factory=dict)  # CalibConfig overrides (accuracy variants)
    variant: str | None = None
    zeroshot: bool = False

    @property
    def label(self) -> str:
        w, a, k, v = self.bits
        bits = f"W{w}A{a}" + (f"KV{k}" if k == v else f"K{k}V{v}")
        extra = "".join(f" {k}={v}" for k, v in self.settings.items())
        return f"[{','.join(self.tables)}] {self.method} {bits}{extra}" + (f" ({self.variant})" if self.variant else "")


def plan_rows(tables: list[str], variants: list[str], group: int, kv_group: int | None) -> list[Row]:
    rows: dict[tuple, Row] = {}

    def add(table, row):
        key = (row.method, row.bits, tuple(sorted(row.settings.items())), row.params, row.variant)
        if key in rows:
            rows[key].tables.append(table)
        else:
            rows[key] = replace(row, tables=[table])

    if "11" in tables:
        for w in (4, 3):
            b = (w, 16, 16, 16)
            add("11", Row([], "rtn", b))
            add("11", Row([], "rtn", b, {"weight_quantizer": "gptq"}))
            add("11", Row([], "rtn", b, {"weight_quantizer": "gptq", "w_group_size": group}))
            add("11", Row([], "quarot", b))
            add("11", Row([], "flatquant", b, params=f"w{w}a16", train_bits=b, variant="paper-recipe"))
            add("11", Row([], "flatquant", b, {"weight_quantizer": "gptq"}, params=f"w{w}a16-gptq", train_bits=b,
                          variant="paper-recipe"))
    kv = {"kv_group_size": kv_group} if kv_group else {}
    for table, grid in (("12", [(k, v) for k in (4, 3, 2) for v in (4, 3, 2)]), ("13", [(4, 4), (3, 3), (2, 2)])):
        if table in tables:
            add(table, Row([], "fp16", (16, 16, 16, 16)))
            for k, v in grid:
                b = (16, 16, k, v)
                add(table, Row([], "quarot", b, dict(kv)))
                add(table, Row([], "flatquant", b, dict(kv), params=f"k{k}v{v}", train_bits=b, variant="paper-recipe"))
    if "14" in tables:
        for n in (3, 4):
            b = (n, n, n, n)
            add("14", Row([], "quarot", b, zeroshot=True))
            add("14", Row([], "flatquant", b, params=f"w{n}a{n}kv{n}", train_bits=b, variant="paper-recipe",
                          zeroshot=True))
    if "15" in tables:
        for b in ((4, 16, 16, 16), (16, 4, 16, 16), (16, 16, 4, 4), (4, 4, 4, 4)):
            add("15", Row([], "flatquant", b, params="w4a4kv4", train_bits=(4, 4, 4, 4), variant="paper-recipe",
                          zeroshot=True))
    for name in variants:
        add("variants", Row([], "flatquant", (4, 4, 4, 4), {"weight_quantizer": "gptq"}, params=f"acc-{name}-gptq",
                            train_bits=(4, 4, 4, 4), calib=VARIANTS[name], variant=f"acc-{name}"))
    return list(rows.values())


def estimate(row: Row, done: set[str], n_datasets: int, zeroshot: bool) -> float:
    t = EST["ppl"] * n_datasets + (EST["zeroshot"] if row.zeroshot and zeroshot else 0.0)
    gptq = row.settings.get("weight_quantizer") == "gptq"
    if row.method == "flatquant":
        return t + (EST["load"] if row.params in done else EST["calib"] + (EST["gptq"] if gptq else 0.0))
    return t + (EST["gptq"] if gptq else EST["fast"])


def order(rows: list[Row], n_datasets: int, zeroshot: bool) -> list[tuple[Row, float]]:
    """Cheapest first; a row evaluated from parameters another row trains costs a load once they exist."""
    left, done, out = list(rows), set(), []
    while left:
        # ties: the row at the parameters' own bits trains them (its records are the fresh calibration's)
        row = min(left, key=lambda r: (estimate(r, done, n_datasets, zeroshot), r.train_bits not in (None, r.bits)))
        out.append((row, estimate(row, done, n_datasets, zeroshot)))
        left.remove(row)
        if row.params:
            done.add(row.params)
    return out


def qconfig(bits, method, **settings):
    w, a, k, v = bits
    return method_config(method, w_bits=w, a_bits=a, kv_bits=v, k_bits=k, v_bits=v, **settings)  # as --kv-bits V --k-bits K


def _complete(params: Path) -> bool:
    meta = params / "flatquant.json"
    return meta.is_file() and bool(json.loads(meta.read_text()).get("complete"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model-name", default="SmolLM2-135M-Instruct")
    ap.add_argument("--out-dir", required=True, help="parameters in <out-dir>/params, records in --results-dir")
    ap.add_argument("--results-dir", default=None, help="default: <out-dir>/results")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--tables", default="11,12,13,14,15")
    ap.add_argument("--variants", default="", help=f"comma-separated from {', '.join(VARIANTS)} ('' = none)")
    ap.add_argument("--datasets", default="wikitext2,c4")
    ap.add_argument("--tasks", default=",".join(TASKS), help="zero-shot tasks of the rows of tables 14 and 15")
    ap.add_argument("--no-zeroshot", action="store_true", help="skip zero-shot evaluation")
    ap.add_argument("--limit", type=int, default=None, help="zero-shot examples per task (default: all)")
    ap.add_argument("--zeroshot-batch-size", type=int, default=32, help="lm-eval batch size")
    ap.add_argument("--w-group-size", type=int, default=128, help="GPTQ-g<N> row of table 11")
    ap.add_argument("--kv-group-size", type=int, default=None,
                    help="KV groups of tables 12/13 (default: the whole head, head_dim channels)")
    ap.add_argument("--max-seconds", type=float, default=None, help="start no new row after this much wall time")
    ap.add_argument("--dry-run", action="store_true", help="print the planned rows and stop")
    ap.add_argument("--rerun", action="store_true",
                    help="run rows again that <out-dir>/done.json lists as finished (default: skip them, so "
                         "repeated calls with --max-seconds continue where the last one stopped)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run: tiny recipe, 2 windows of 64 tokens")
    args = ap.parse_args(argv)
    tables = [t for t in args.tables.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    bad = [t for t in tables if t not in ("11", "12", "13", "14", "15")] + [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown table or variant {bad[0]!r}")
    datasets = [d for d in args.datasets.split(",") if d]
    zeroshot = not args.no_zeroshot and bool(args.tasks)
    rows = order(plan_rows(tables, variants, args.w_group_size, args.kv_group_size), len(datasets), zeroshot)
    print(f"{len(rows)} rows planned (estimated seconds are rough H100 figures):")
    for i, (row, est) in enumerate(rows):
        print(f"  {i + 1:3d}. ~{est:5.0f}s  {row.label}")
    print(f"  total ~{sum(e for _, e in rows):.0f}s" + (f"; --max-seconds {args.max_seconds:g}" if args.max_seconds
                                                         is not None else ""), flush=True)
    if args.dry_run:
        return 0
    return run_rows(args, rows, datasets, zeroshot)


def run_rows(args, rows, datasets, zeroshot) -> int:
    import torch

    from flatquant import data
    from flatquant.io import atomic_write_text
    from flatquant.models.loading import load_model
    from flatquant.runner import EvalSpec, calibration_data, run_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, device=device)
    out = Path(args.out_dir)
    results = args.results_dir or str(out / "results")
    seqlen = 64 if args.smoke else 2048
    spec = EvalSpec(datasets=datasets, seqlen=seqlen, max_windows=2 if args.smoke else None,
                    batch_size=2 if args.smoke else 8, data_dir=args.data_dir,
                    zeroshot_batch_size=args.zeroshot_batch_size)
    for ds in datasets:
        spec.tokens[ds] = data.eval_tokens(tok, ds, data_dir=args.data_dir, seqlen=seqlen)
    tasks = [t for t in args.tasks.split(",") if t] if zeroshot else []
    limit = args.limit if args.limit is not None else (2 if args.smoke else None)
    base_calib = CalibConfig(**SMOKE) if args.smoke else calib_preset("paper")
    windows = calibration_data(tok, base_calib, args.data_dir)
    done_file = out / "done.json"
    done = set() if args.rerun or not done_file.is_file() else set(json.loads(done_file.read_text()))
    t0 = time.time()
    for i, (row, _) in enumerate(rows):
        key = f"{row.label} | {','.join(datasets)} | {','.join(tasks) if row.zeroshot else ''} | smoke={args.smoke}"
        if key in done:
            print(f"[{i + 1}/{len(rows)}] {row.label}: done before (in {done_file}; --rerun repeats it)")
            continue
        if args.max_seconds is not None and time.time() - t0 >= args.max_seconds:
            print(f"--max-seconds {args.max_seconds:g} reached: {len(rows) - i} row(s) not started", flush=True)
            break
        t = time.time()
        row_spec = replace(spec, tasks=tasks if row.zeroshot else [], limit=limit)
        ccfg = replace(base_calib, **row.calib)
        qcfg = qconfig(row.bits, row.method, **row.settings,
                       **({"calib": ccfg} if row.method == "flatquant" else {}))
        params = None
        if row.method == "flatquant":
            params = out / "params" / row.params
            params.parent.mkdir(parents=True, exist_ok=True)
            if row.train_bits != row.bits and not _complete(params):  # train at train_bits first
                train = qconfig(row.train_bits, "flatquant", **row.settings, calib=ccfg)
                run_config(model, tok, args.model_name, "flatquant", train, replace(row_spec, datasets=[], tasks=[]),
                           ccfg=ccfg, calib=windows, params_dir=str(params), results_dir=None, progress=False,
                           variant=row.variant)
        recs = run_config(model, tok, args.model_name, row.method, qcfg, row_spec, ccfg=ccfg, calib=windows,
                          params_dir=str(params) if params else None, results_dir=results, progress=False,
                          variant=row.variant)
        ppl = ", ".join(f"{r['dataset']} {r['ppl']:.3f}" for r in recs if r["kind"] == "ppl")
        zs = "".join(f", zero-shot avg {r['average']:.2f}" for r in recs if r["kind"] == "zeroshot")
        print(f"[{i + 1}/{len(rows)}] {row.label}: {ppl}{zs} ({time.time() - t:.0f}s)", flush=True)
        done.add(key)
        atomic_write_text(done_file, json.dumps(sorted(done), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
