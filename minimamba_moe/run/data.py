"""Training data: a corpus tokenized once into a memmap cache, then random windows read from it.

Where the text comes from (``prepare_data``):
    default                the Python standard library's own .py files (found through ``sysconfig``;
                           present on every Python install, so the quick start needs no network)
    data="path"            a local text file, or a folder of them (every file, read as UTF-8)
    dataset="path.jsonl"   a local text / json / jsonl / csv / parquet file, loaded with `datasets`
    dataset="owner/name"   a Hugging Face hub dataset, streamed (needs the network)

Cache layout (one folder per corpus + tokenizer, so a second run starts at once):
    <cache_dir>/<name>-<tokenizer>-<hash>/
        train.bin, val.bin   the token ids, uint16 (vocab <= 65536) or uint32, back to back
        meta.json            dtype, token counts, where the text came from
The folder is built under a temporary name and renamed when complete, so an interrupted
tokenization never leaves a half-written cache behind. A cache found again is checked before use
(``check_cache``: meta.json describes this corpus, tokenizer and vocabulary, and the token files
have the sizes it records); a damaged or stale one is refused, naming the folder to delete.

Sampling (``Batches``): the windows of a step are a pure function of (seed, split, step), drawn for
the whole *global* batch and then sliced by micro-batch and rank. So a resumed run reads exactly
the data it would have read, every rank reads different rows, and splitting a batch into
micro-batches or ranks does not change which rows the step trains on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = 1
DEFAULT_CACHE_DIR = "data_cache"
LOCAL_BUILDERS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
                  ".parquet": "parquet"}


class DataError(ValueError):
    """The data cannot be found or read; the message says what to do instead."""


# --- where the text comes from ------------------------------------------------------------------
def stdlib_files() -> list[Path]:
    """The standard library's .py sources, without site-packages and the test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    return sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))


def local_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        if files:
            return files
        raise DataError(f"--data={path} is a folder with no files in it.")
    what = "is neither a file nor a folder" if p.exists() else "does not exist"  # e.g. /dev/null, a pipe
    raise DataError(f"--data={path} {what}: give a text file or a folder of text files "
                    "(or leave --data out to train on the Python standard library's sources).")


def iter_files(files: list[Path]):
    for f in files:
        yield read_text_file(f)


MAX_UNDECODABLE = 0.01  # a file with more bytes than this that are not UTF-8 is not text


def read_text_file(path: Path) -> str:
    """A data file's text; refused (DataError) if it is binary: NUL bytes, or more than 1% of it not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"Cannot read the data file {path} ({e.strerror}).") from None
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    nul = b"\0" in raw[:65536]
    if nul or bad > MAX_UNDECODABLE * max(1, len(text)):
        why = "it holds NUL bytes" if nul else f"{bad:,} of its {len(raw):,} bytes do not decode"
        raise DataError(f"The data file {path} is not UTF-8 text ({why}): give text files only "
                        "(convert other encodings to UTF-8 first).")
    return text


def iter_dataset(dataset: str, dataset_config: str, text_field: str):
    """The texts of a `datasets` dataset: a local file (any machine) or a hub name (streamed)."""
    local = Path(dataset)
    if not local.exists() and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # no network: use a cached copy if there is one, without retries
    try:
        import datasets
    except ImportError:
        raise DataError("--dataset needs the `datasets` package: pip install datasets.") from None
    datasets.disable_progress_bars()
    if local.exists():
        builder = LOCAL_BUILDERS.get(local.suffix.lower()) if local.is_file() else None
        if builder is None:
            raise DataError(f"--dataset={dataset}: a local file must end in {', '.join(LOCAL_BUILDERS)}; "
                            "for a folder of plain text use --data instead.")
        quiet = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # it logs the error too: one line is ours
        try:
            ds = datasets.load_dataset(builder, data_files=str(local), split="train")
        except Exception as e:
            raise DataError(f"--dataset={dataset} {_why_unreadable(e, builder)}") from None
        finally:
            datasets.logging.set_verbosity(quiet)
    else:
        if re.match(r"^[./~]|.*\.(txt|md|jsonl?|csv|parquet)$", dataset):
            raise DataError(f"--dataset={dataset}: no such file.")
        try:
            ds = datasets.load_dataset(dataset, dataset_config or None, split="train", streaming=True)
            first = next(iter(ds))
        except Exception as e:
            raise DataError(
                f"Could not load the hub dataset {dataset!r} ({type(e).__name__}; is this machine offline?). "
                "Download it where there is a network, or train on local files: --data=path/to/text_or_folder "
                "or --dataset=path/to/file.jsonl|.parquet|.txt."
            ) from None
        if text_field not in first:
            raise DataError(f"The dataset {dataset!r} has no field {text_field!r}; its fields: "
                            f"{', '.join(first)}. Pick one with --text_field.")
    if getattr(ds, "column_names", None) and text_field not in ds.column_names:
        raise DataError(f"--dataset={dataset} has no field {text_field!r}; its fields: "
                        f"{', '.join(ds.column_names)}. Pick one with --text_field.")
    for i, row in enumerate(ds):
        text = row[text_field]
        if not isinstance(text, str):
            kind = "null" if text is None else type(text).__name__
            raise DataError(f"--dataset={dataset}: row {i + 1} has {text_field!r} = {kind}, not text: every row's "
                            f"{text_field!r} must be a string (pick another column with --text_field).")
        yield text


def _why_unreadable(e: BaseException, builder: str) -> str:
    """What `datasets` could not read, from the exception under its wrapper (which says only "An error
    occurred while generating the dataset")."""
    chain = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    if any(isinstance(c, UnicodeDecodeError) for c in chain):
        return "is not UTF-8 text: convert it to UTF-8 first."
    if isinstance(chain[-1], StopIteration):  # the builder found no rows at all
        return f"holds no rows: give a non-empty {builder} file."
    lines = [str(c).strip().splitlines()[0] for c in chain if str(c).strip()]
    lines = [line for line in lines if not line.startswith("An error occurred while generating")] or lines
    return f"could not be read as {builder}: {lines[0] if lines else type(e).__name__}"


def hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# --- tokenize once into the cache ---------------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[-40:] or "data"


def cache_key(data: str, dataset: str, dataset_config: str, text_field: str, tokenizer: str,
              val_every: int, max_tokens: int) -> tuple[str, dict]:
    """The cache folder's name and the description that identifies its contents."""
    if dataset:
        source = {"dataset": dataset, "config": dataset_config, "text_field": text_field}
        local = Path(dataset)
        if local.is_file():
            st = local.stat()
            source.update(dataset=str(local.resolve()), size=st.st_size, mtime=st.st_mtime_ns)
        name = local.stem if local.is_file() else dataset
    else:
        files = local_files(data) if data else stdlib_files()
        h = hashlib.sha256()
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        source = {"data": str(Path(data).resolve()) if data else "python-stdlib", "files": len(files),
                  "files_hash": h.hexdigest()}
        name = Path(data).name if data else "python-stdlib"
    tok = tokenizer if tokenizer in ("bytes", "gpt2") else f"{Path(tokenizer).name}:{_file_hash(tokenizer)}"
    desc = {"format": FORMAT, "source": source, "tokenizer": tok, "val_every": val_every, "max_tokens": max_tokens}
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:12]
    return f"{_slug(name)}-{_slug(Path(tokenizer).stem)}-{digest}", desc


def _file_hash(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    except OSError:
        return "missing"


def prepare_data(tokenizer, tokenizer_spec: str, data: str = "", dataset: str = "", dataset_config: str = "",
                 text_field: str = "text", cache_dir: str = DEFAULT_CACHE_DIR, val_every: int = 100,
                 max_tokens: int = 0, log=print) -> Path:
    """Tokenize the corpus into ``cache_dir`` unless it is there already; return its folder.

    Documents are separated by the tokenizer's end-of-text token (none for bytes); every
    ``val_every``-th document goes to the validation split. ``max_tokens`` > 0 stops reading after
    that many tokens (for large streamed datasets).
    """
    if data and dataset:
        raise DataError("Give --data (a local text file or folder) or --dataset (a `datasets` name or file), not both.")
    name, desc = cache_key(data, dataset, dataset_config, text_field, tokenizer_spec, val_every, max_tokens)
    final = Path(cache_dir) / name
    if final.exists():
        check_cache(final, desc, tokenizer.vocab_size)
        return final
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
    except OSError as e:
        raise DataError(f"Cannot write the data cache in {cache_dir} ({e.strerror}); choose another --data_cache.") from None
    texts = iter_dataset(dataset, dataset_config, text_field) if dataset else iter_files(
        local_files(data) if data else stdlib_files())
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    eot = [] if tokenizer.eot_token is None else [tokenizer.eot_token]
    counts = {"train": 0, "val": 0}
    log(f"tokenizing {desc['source'].get('dataset') or desc['source']['data']} with {tokenizer_spec} into {final} ...")
    if dataset and not Path(dataset).exists() and not max_tokens:
        log("  (streaming the whole dataset; --max_data_tokens=N stops after N tokens)")
    try:
        with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
            for i, text in enumerate(texts):
                if tokenizer.name == "bytes":  # a fast path for 12 MB of stdlib
                    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)
                else:
                    ids = np.asarray(tokenizer.encode(text) + eot, dtype=dtype)
                split = "val" if i % val_every == val_every - 1 else "train"
                (fval if split == "val" else ftrain).write(ids.tobytes())
                counts[split] += len(ids)
                if max_tokens and counts["train"] + counts["val"] >= max_tokens:
                    break
        if counts["train"] + counts["val"] == 0:
            raise DataError(f"{desc['source'].get('dataset') or desc['source']['data']} holds no text: give a non-empty file.")
        if counts["val"] == 0:  # fewer documents than val_every: hold out the tail of the one stream
            train = np.fromfile(tmp / "train.bin", dtype=dtype)
            n_val = max(len(train) // val_every, min(len(train) // 2, 4096))
            train[:-n_val].tofile(tmp / "train.bin")
            train[-n_val:].tofile(tmp / "val.bin")
            counts = {"train": len(train) - n_val, "val": n_val}
        meta = {**desc, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size, "tokens": counts,
                "documents": {"total": i + 1, "val": (i + 1) // val_every}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same cache first: use theirs
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"  {counts['train']:,} train tokens, {counts['val']:,} val tokens")
    return final


def check_cache(folder: Path, desc: dict, vocab_size: int) -> None:
    """Refuse (DataError) a cache folder that is not what ``desc`` and the tokenizer would build: meta.json
    missing or unreadable, describing another corpus or tokenizer, or token files of the wrong size."""
    def refuse(why: str):
        return DataError(f"The data cache {folder} is damaged or stale ({why}): delete that folder and run again "
                         "to tokenize the corpus afresh.")

    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise refuse("meta.json is missing") from None
    except (OSError, ValueError):
        raise refuse("meta.json is not readable JSON") from None
    if not isinstance(meta, dict):
        raise refuse("meta.json is not a JSON object")
    changed = [k for k, v in desc.items() if meta.get(k) != v]
    if changed:
        raise refuse(f"meta.json describes another {', '.join(changed)}")
    if meta.get("vocab_size") != vocab_size:
        raise refuse(f"tokenized for a vocabulary of {meta.get('vocab_size')}, the tokenizer has {vocab_size}")
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        counts = {split: int(meta["tokens"][split]) for split in ("train", "val")}
    except (KeyError, TypeError, ValueError):
        raise refuse("meta.json lacks the dtype or the token counts") from None
    for split, n in counts.items():
        path = folder / f"{split}.bin"
        if not path.is_file():
            raise refuse(f"{split}.bin is missing")
        if path.stat().st_size != n * itemsize:
            raise refuse(f"{split}.bin holds {path.stat().st_size:,} bytes, meta.json says {n:,} tokens of {meta['dtype']}")


# --- sampling -----------------------------------------------------------------------------------
class Batches:
    """Random windows of ``seq_len + 1`` tokens from one split of a prepared cache."""

    def __init__(self, folder: Path, split: str, seq_len: int, seed: int):
        meta = json.loads((Path(folder) / "meta.json").read_text())
        if (Path(folder) / f"{split}.bin").stat().st_size == 0:
            raise DataError(f"The {split} split is empty: use more data.")
        self.tokens = np.memmap(Path(folder) / f"{split}.bin", dtype=meta["dtype"], mode="r")
        self.vocab_size = meta["vocab_size"]
        self.split, self.seq_len, self.seed = split, seq_len, seed
        if len(self.tokens) <= seq_len + 1:
            docs = meta.get("documents", {})
            why = ""
            if split == "val" and docs.get("val"):  # a few (short) documents: every val_every-th one
                why = (f" (one document in {meta['val_every']}: {docs['val']} of {docs['total']} documents; "
                       "a lower --val_every puts more there)")
            raise DataError(f"The {split} split has {len(self.tokens):,} tokens{why}, too few for seq_len={seq_len}: "
                            "use more data or a shorter --seq_len.")

    def get(self, step: int, batch_size: int, micro: int = 0, n_micro: int = 1, rank: int = 0, world: int = 1):
        """Step ``step``'s micro-batch ``micro`` for ``rank``: (x, y) int64 tensors of shape (batch_size, seq_len).

        The step's global batch is batch_size * n_micro * world windows drawn from a generator seeded
        by (seed, split, step); this call returns rows [(micro * world + rank) * batch_size, ...+batch_size).
        """
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=batch_size * n_micro * world)
        i = (micro * world + rank) * batch_size
        rows = np.stack([self.tokens[s: s + self.seq_len + 1] for s in starts[i: i + batch_size]]).astype(np.int64)
        xy = torch.from_numpy(rows)
        return xy[:, :-1], xy[:, 1:]
