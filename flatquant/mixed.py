"""Per-layer / per-projection mixed precision: the `--mixed` spec (QuantConfig.mixed).

Grammar (clauses apply in order; a later clause overrides an earlier one where both apply):
    SPEC   := CLAUSE (";" CLAUSE)*
    CLAUSE := ["layers=" LAYERS ":"] [PROJS "="] BITS
    LAYERS := decoder-layer indices (0-based) and ranges, comma-separated: 0,1,29 or 0-3,29
    PROJS  := projection names, comma-separated: down_proj or q_proj,k_proj,v_proj
    BITS   := one or more of wN (weights) aN (activations) kN vN kvN (KV cache), e.g. w8a8, kv8, k4v2;
              a bare N means wNaN. kN / vN / kvN only without PROJS. N is 2-16 (16 = not quantized).
Examples: "down_proj=w8a8;layers=0,1,29:w8a8"   "layers=0-1:kv8"   "q_proj,k_proj,v_proj=a8".
A JSON file is a list of {"layers": [...], "proj": [...], "w": N, "a": N, "k": N, "v": N} (each key optional).

What cannot be honoured is an error, never ignored: an unknown projection, a layer the model lacks, and an
activation override of a projection whose input quantizer is shared (k_proj/v_proj share q_proj's,
up_proj gate_proj's) unless the shared site gets the same bits (name q_proj too).
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from flatquant.errors import FlatQuantError

_BITS = re.compile(r"(kv|w|a|k|v)(\d+)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*$")
KEYS = ("w", "a", "k", "v")


class MixedSpecError(FlatQuantError, ValueError):
    """A --mixed spec that cannot be read or honoured."""


@dataclass(frozen=True)
class Rule:
    layers: frozenset[int] | None  # None = every layer
    projs: tuple[str, ...] | None  # None = every projection
    bits: tuple[tuple[str, int], ...]  # (key, bits), key in KEYS

    def get(self, key: str) -> int | None:
        return dict(self.bits).get(key)


def _layers(text: str, spec: str) -> frozenset[int]:
    out = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise MixedSpecError(f"--mixed {spec!r}: bad layer list {text!r} (use e.g. 0,1,29 or 0-3)")
        out.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return frozenset(out)


def _bits(text: str, spec: str, with_projs: bool) -> tuple[tuple[str, int], ...]:
    text = text.strip().lower()
    if text.isdigit():
        pairs = [("w", int(text)), ("a", int(text))]
    else:
        if not text or _BITS.sub("", text):
            raise MixedSpecError(f"--mixed {spec!r}: bad bits {text!r} (use e.g. w8a8, w8, a8, kv8, k4v2 or 8)")
        pairs = []
        for key, n in _BITS.findall(text):
            pairs += [("k", int(n)), ("v", int(n))] if key == "kv" else [(key, int(n))]
    for key, n in pairs:
        if not 2 <= n <= 16:
            raise MixedSpecError(f"--mixed {spec!r}: bits must be 2-16, got {n}")
        if with_projs and key in ("k", "v"):
            raise MixedSpecError(f"--mixed {spec!r}: KV bits (k/v/kv) apply to layers, not to projections")
    if len({k for k, _ in pairs}) != len(pairs):
        raise MixedSpecError(f"--mixed {spec!r}: {text!r} sets the same bits twice")
    return tuple(pairs)


@functools.lru_cache(maxsize=64)
def parse(spec: str) -> tuple[Rule, ...]:
    """The rules of a spec string (MixedSpecError on anything it cannot read)."""
    if not isinstance(spec, str) or not spec.strip():
        raise MixedSpecError(f"--mixed: empty spec {spec!r}")
    rules = []
    for clause in spec.split(";"):
        clause = clause.strip()
        if not clause:
            raise MixedSpecError(f"--mixed {spec!r}: empty clause")
        layers = None
        if clause.startswith("layers="):
            scope, sep, clause = clause[len("layers="):].partition(":")
            if not sep:
                raise MixedSpecError(f"--mixed {spec!r}: 'layers=...' must be followed by ':' and bits")
            layers = _layers(scope, spec)
        projs = None
        if "=" in clause:
            names, _, clause = clause.partition("=")
            projs = tuple(n.strip() for n in names.split(","))
            if not all(_NAME.match(n) for n in projs):
                raise MixedSpecError(f"--mixed {spec!r}: bad projection list {names!r}")
        rules.append(Rule(layers, projs, _bits(clause, spec, projs is not None)))
    return tuple(rules)


def resolve(spec: str, key: str, proj: str | None, layer: int | None, default: int) -> int:
    """The bits of `key` for projection `proj` (None for KV) of layer `layer` (None: only rules for every
    layer apply) after the spec's rules, starting from `default`."""
    bits = default
    for r in parse(spec):
        if r.layers is not None and (layer is None or layer not in r.layers):
            continue
        if r.projs is not None and proj not in r.projs:
            continue
        if r.get(key) is not None:
            bits = r.get(key)
    return bits


def _from_json(data, source: str) -> str:
    if not isinstance(data, list) or not data:
        raise MixedSpecError(f"--mixed {source}: expected a non-empty JSON list of rules")
    clauses = []
    for item in data:
        if not isinstance(item, dict) or not set(item) <= {"layers", "proj", *KEYS} or not set(item) & set(KEYS):
            raise MixedSpecError(f"--mixed {source}: bad rule {item!r} (keys: layers, proj, w, a, k, v)")
        bits = "".join(f"{k}{item[k]}" for k in KEYS if k in item)
        if any(isinstance(item[k], bool) or not isinstance(item[k], int) for k in KEYS if k in item):
            raise MixedSpecError(f"--mixed {source}: bits must be integers in {item!r}")
        text = bits
        for key, sep in (("proj", "="), ("layers", ":")):
            if key in item:
                vals = item[key] if isinstance(item[key], list) else [item[key]]
                if not vals or (key == "layers" and not all(isinstance(v, int) and v >= 0 for v in vals)):
                    raise MixedSpecError(f"--mixed {source}: bad {key} in {item!r}")
                text = ("layers=" if key == "layers" else "") + ",".join(str(v) for v in vals) + sep + text
        clauses.append(text)
    return ";".join(clauses)


def load_spec(value: str) -> str:
    """A --mixed value as a spec string: the string itself, or a JSON file's rules (path ending .json)."""
    if value.strip().lower().endswith(".json"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise MixedSpecError(f"--mixed {value}: no such file")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MixedSpecError(f"--mixed {value}: not valid JSON ({e})") from None
        value = _from_json(data, value)
    parse(value)
    return value


def check(cfg, family, num_layers: int) -> None:
    """MixedSpecError unless every rule of cfg (and its per-projection overrides) can be honoured on a model
    of `family` with `num_layers` decoder layers."""
    roles = [r for rs in family.sites.values() for r in rs]
    named = set(cfg.w_bits_override) | set(cfg.a_bits_override)
    rules = parse(cfg.mixed) if cfg.mixed else ()
    for r in rules:
        named |= set(r.projs or ())
        bad = sorted(i for i in (r.layers or ()) if i >= num_layers)
        if bad:
            raise MixedSpecError(f"--mixed {cfg.mixed!r}: layer {bad[0]} does not exist "
                                 f"(the model has layers 0-{num_layers - 1})")
    unknown = sorted(named - set(roles))
    if unknown:
        raise MixedSpecError(f"mixed precision names projection {unknown[0]!r}; this model's are {', '.join(roles)}")
    layers = range(num_layers) if any(r.layers for r in rules) else [None]
    for layer in layers:
        check_shared_sites(cfg, family, layer)


def check_shared_sites(cfg, family, layer: int | None) -> None:
    """Activation bits must agree across the projections that read one shared input quantizer."""
    for roles in family.sites.values():
        first = cfg.act_bits(roles[0], layer)
        for role in roles[1:]:
            if cfg.act_bits(role, layer) != first:
                where = "" if layer is None else f" in layer {layer}"
                raise MixedSpecError(
                    f"activation bits of {role} ({cfg.act_bits(role, layer)}){where} differ from {roles[0]}'s "
                    f"({first}): they share one input quantizer; give {', '.join(roles)} the same activation bits")
