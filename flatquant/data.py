"""Text sources and token windows for evaluation and calibration.

Named sources live in a data folder with the layout of ``../shared/data``:

=============  ==========================================  ==========================================
name           file                                        text
=============  ==========================================  ==========================================
``wikitext2``  ``wikitext2/wikitext2_raw_test.txt``        used as is (GPTQ's ``"\\n\\n".join(test)``)
``c4``         ``c4/c4_validation_proxy.jsonl.gz``         first 1,100 docs' ``text`` joined by ``" "``
``wiki-calib`` ``calib/wiki_articles.txt``                 used as is (calibration text)
=============  ==========================================  ==========================================

Any local ``.txt``, ``.jsonl`` or ``.jsonl.gz`` path is accepted as well (JSON lines: field ``text``,
joined with ``"\\n\\n"``). When a named file is missing, the Hugging Face hub is tried only if the
``datasets`` package is importable and ``HF_DATASETS_OFFLINE`` is not ``1`` (see ``_load_from_hub``).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

from flatquant.errors import DataError

DATA_ENV = "FLATQUANT_DATA_DIR"

# name -> path inside the data folder
NAMED_SOURCES = {
    "wikitext2": "wikitext2/wikitext2_raw_test.txt",
    "c4": "c4/c4_validation_proxy.jsonl.gz",
    "wiki-calib": "calib/wiki_articles.txt",
}
ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "wiki2": "wikitext2", "calib": "wiki-calib",
           "c4-proxy": "c4"}
C4_DOCS = 1100  # GPTQ-style C4 eval: the first 1,100 validation documents, joined by " "
C4_WINDOWS = 256  # ... of which the first 256 windows of seqlen tokens are scored
ZEROSHOT_DIR = "zeroshot"


def _candidates() -> list[Path]:
    repo_root = Path(__file__).resolve().parents[1]
    return [Path.cwd() / ".." / "shared" / "data", repo_root.parent / "shared" / "data"]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data folder: the argument, else $FLATQUANT_DATA_DIR, else ../shared/data (from the current
    directory, then from the repository root). Raises DataError when none exists."""
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise DataError(f"data directory {p} does not exist (--data-dir)")
        return p.resolve()
    env = os.environ.get(DATA_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DataError(f"data directory {p} from ${DATA_ENV} does not exist")
        return p.resolve()
    for c in _candidates():
        if c.is_dir():
            return c.resolve()
    raise DataError(f"no data directory found: pass --data-dir or set ${DATA_ENV} "
                    f"(looked for ../shared/data from {Path.cwd()} and from the repository)")


def canonical_source(source: str) -> str:
    """Named sources are case-insensitive and have a few aliases; anything else (a path) is kept as is."""
    s = str(source)
    key = ALIASES.get(s.lower(), s.lower())
    return key if key in NAMED_SOURCES else s


def _is_local_path(source: str) -> bool:
    s = str(source)
    return s.endswith((".txt", ".jsonl", ".jsonl.gz", ".json.gz")) or os.sep in s or Path(s).is_file()


def _read_jsonl_texts(path: Path, limit: int | None = None) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    texts: list[str] = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or "text" not in obj:
                    raise DataError(f"{path}: line {lineno} has no 'text' field")
                texts.append(str(obj["text"]))
                if limit is not None and len(texts) >= limit:
                    break
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    except UnicodeDecodeError as e:  # binary or non-UTF-8 content
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return texts


def _read_file_text(path: Path, joiner: str = "\n\n", limit_docs: int | None = None) -> str:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        return joiner.join(_read_jsonl_texts(path, limit_docs))
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _hub_allowed() -> bool:
    if os.environ.get("HF_DATASETS_OFFLINE", "0") == "1" or os.environ.get("HF_HUB_OFFLINE", "0") == "1":
        return False
    try:
        import datasets  # noqa: F401 - only whether it is installed matters
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# Online fallback (only when the local file is missing). Kept small and separate on purpose.
# ---------------------------------------------------------------------------------------------------
def _load_from_hub(name: str) -> str:  # pragma: no cover - needs network
    import datasets

    if name == "wikitext2":
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return "\n\n".join(ds["text"])
    if name == "c4":
        ds = datasets.load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                   split="validation")
        return " ".join(ds[:C4_DOCS]["text"])
    raise DataError(f"no hub fallback for {name!r}")


def load_text(source: str, data_dir: str | Path | None = None) -> str:
    """The raw text of a named source (wikitext2, c4, wiki-calib) or a local .txt/.jsonl/.jsonl.gz file."""
    name = canonical_source(source)
    if name not in NAMED_SOURCES:
        if _is_local_path(name):
            return _read_file_text(Path(name).expanduser())
        raise DataError(f"unknown text source {source!r}: use one of {', '.join(NAMED_SOURCES)} "
                        "or a path to a .txt/.jsonl/.jsonl.gz file")
    try:
        path = resolve_data_dir(data_dir) / NAMED_SOURCES[name]
    except DataError:
        if data_dir is None and name != "wiki-calib" and _hub_allowed():
            return _load_from_hub(name)
        raise
    if not path.is_file():
        if name != "wiki-calib" and _hub_allowed() and data_dir is None:
            try:
                return _load_from_hub(name)
            except Exception as e:  # pragma: no cover - network
                raise DataError(f"data file not found: {path}, and the hub fallback failed: {e}") from None
        raise DataError(f"data file not found: {path} (for source {name!r}; set --data-dir or ${DATA_ENV})")
    if name == "c4":
        return _read_file_text(path, joiner=" ", limit_docs=C4_DOCS)
    return _read_file_text(path)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """``tokenizer(text).input_ids`` as a (1, N) LongTensor, without truncation and without the
    'sequence longer than the model maximum' warning (the text is cut into windows afterwards)."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    key = "sequence-length-is-longer-than-the-specified-maximum"
    old = flags.get(key) if isinstance(flags, dict) else None
    if isinstance(flags, dict):
        flags[key] = True  # the warning is emitted once per tokenizer: mark it as already shown
    try:
        ids = tokenizer(text, return_tensors="pt", truncation=False).input_ids
    finally:
        if isinstance(flags, dict):
            if old is None:
                flags.pop(key, None)
            else:
                flags[key] = old
    return ids.long()


def eval_tokens(tokenizer, source: str, data_dir: str | Path | None = None, max_tokens: int | None = None,
                seqlen: int = 2048) -> torch.Tensor:
    """Tokens (1, N) for perplexity. For ``c4`` the GPTQ protocol keeps the first 256*seqlen tokens."""
    name = canonical_source(source)
    ids = tokenize_text(tokenizer, load_text(name, data_dir))
    if name == "c4":
        ids = ids[:, : C4_WINDOWS * seqlen]
    if max_tokens is not None:
        ids = ids[:, : int(max_tokens)]
    return ids


def calibration_windows(tokenizer, source: str = "wiki-calib", nsamples: int = 128, seqlen: int = 2048,
                        seed: int = 0, data_dir: str | Path | None = None) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens (GPTQ style), reproducible from ``seed``."""
    if nsamples < 1 or seqlen < 1:
        raise DataError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    ids = tokenize_text(tokenizer, load_text(source, data_dir))[0]
    return sample_windows(ids, nsamples, seqlen, seed, what=str(source))


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0, what: str = "text") -> torch.Tensor:
    """Random windows (nsamples, seqlen) of a 1-D token tensor; start ~ U[0, N - seqlen - 1]."""
    ids = ids.reshape(-1)
    n = ids.numel()
    if n < seqlen + 1:
        raise DataError(f"{what} has {n} tokens, fewer than seqlen + 1 = {seqlen + 1} needed for a window")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()]).long()


def zeroshot_file(data_dir: str | Path | None, filename: str) -> Path:
    """Absolute path of a zero-shot task file (data_dir/zeroshot/<filename>); DataError if missing."""
    path = resolve_data_dir(data_dir) / ZEROSHOT_DIR / filename
    if not path.is_file():
        raise DataError(f"zero-shot task file not found: {path}")
    return path
