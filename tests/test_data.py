"""Data sources and the token cache (minimamba_moe/run/data.py): local files through `datasets`, bad rows,
damaged or stale caches, a tiny validation split, and training on text without `datasets` installed.

(tests/test_train.py holds the cache's reuse, its change with the corpus, and the batch sampling.)
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from minimamba_moe.run.data import Batches, DataError, prepare_data
from minimamba_moe.run.tokenizer import load_tokenizer
from tests.helpers import hide_and_run

ROOT = Path(__file__).resolve().parent.parent
TEXT = "The quick brown fox jumps over the lazy dog. " * 100


def prepare(tmp_path, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return prepare_data(load_tokenizer("bytes"), "bytes", log=lambda *a: None, **kw)


def jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- local files read through `datasets` -------------------------------------------------------------------
@pytest.mark.parametrize("value, shown", [(None, "null"), (5, "int"), (["a", "b"], "list")])
def test_a_row_whose_text_is_not_text_is_named(tmp_path, value, shown):
    pytest.importorskip("datasets")
    rows = [{"text": TEXT}] * 3 + [{"text": value}] + [{"text": TEXT}] * 3
    with pytest.raises(DataError) as e:
        prepare(tmp_path, dataset=jsonl(tmp_path / "d.jsonl", rows))
    assert "row 4" in str(e.value) and shown in str(e.value) and "'text'" in str(e.value), str(e.value)
    assert not list((tmp_path / "cache").iterdir()), "a half-built cache was left"


def _broken_jsonl(p):
    p.write_text(json.dumps({"text": TEXT}) + "\n{not json\n")


def _latin1_txt(p):
    p.write_bytes(("caf\xe9 " * 2000).encode("latin-1"))


def _bad_parquet(p):
    p.write_text("this is not parquet")


@pytest.mark.parametrize("name, write, needles", [
    ("broken.jsonl", _broken_jsonl, ["could not be read as json", "JSON parse error"]),
    ("latin1.txt", _latin1_txt, ["not UTF-8 text"]),
    ("empty.jsonl", lambda p: p.write_text(""), ["holds no rows"]),
    ("bad.parquet", _bad_parquet, ["could not be read as parquet", "magic bytes"]),
], ids=["broken-json", "latin1", "empty", "not-parquet"])
def test_a_local_file_datasets_cannot_read_is_one_line_with_the_cause(tmp_path, caplog, name, write, needles):
    pytest.importorskip("datasets")
    write(tmp_path / name)
    with pytest.raises(DataError) as e:
        prepare(tmp_path, dataset=str(tmp_path / name))
    message = str(e.value)
    assert all(n in message for n in needles) and "\n" not in message, message
    assert "An error occurred while generating the dataset" not in message
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("datasets")]
    assert not logged, f"datasets' own logging is a second error line: {logged}"


def test_a_data_path_that_is_a_device_is_not_called_missing(tmp_path):
    with pytest.raises(DataError, match="is neither a file nor a folder"):
        prepare(tmp_path, data=os.devnull)
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path, data=str(tmp_path / "nowhere.txt"))


# --- the validation split --------------------------------------------------------------------------------
def test_a_tiny_validation_split_says_which_setting_makes_it(tmp_path):
    corpus = tmp_path / "many"
    corpus.mkdir()
    for i in range(150):  # every 100th document goes to val: here only #100, one byte long
        (corpus / f"{i:03d}.txt").write_text("x" if i == 99 else TEXT)
    folder = prepare(tmp_path, data=str(corpus))
    Batches(folder, "train", 16, 0)
    with pytest.raises(DataError, match="--val_every") as e:
        Batches(folder, "val", 16, 0)
    assert "1 of 150 documents" in str(e.value), str(e.value)


# --- the cache: never reused stale, refused when damaged ------------------------------------------------------
def test_another_tokenizer_or_a_changed_file_gets_its_own_cache(tmp_path):
    ranks = Path("/work/shared/data/gpt2.tiktoken")
    f = tmp_path / "a.txt"
    f.write_text(TEXT)
    by_bytes = prepare(tmp_path, data=str(f))
    if ranks.is_file():
        tok = load_tokenizer(str(ranks))
        by_bpe = prepare_data(tok, str(ranks), data=str(f), cache_dir=str(tmp_path / "cache"), log=lambda *a: None)
        assert by_bpe != by_bytes and json.loads((by_bpe / "meta.json").read_text())["vocab_size"] == tok.vocab_size
    stat = f.stat()
    f.write_text(TEXT.upper())  # same size, other text; even with the old modification time
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    again = prepare(tmp_path, data=str(f))
    assert again != by_bytes
    assert bytes(np.fromfile(again / "train.bin", dtype=np.uint16).astype(np.uint8)).decode().startswith("THE QUICK")


def _odd_size(folder):
    p = folder / "train.bin"
    p.write_bytes(p.read_bytes()[:-1])


def _edit_meta(**fields):
    def edit(folder):
        meta = json.loads((folder / "meta.json").read_text())
        meta.update(fields)
        (folder / "meta.json").write_text(json.dumps(meta))
    return edit


@pytest.mark.parametrize("damage, needle", [
    (_odd_size, "train.bin holds"),
    (lambda f: (f / "val.bin").unlink(), "val.bin is missing"),
    (lambda f: (f / "meta.json").write_text('{"dtype": "uint16"'), "meta.json is not"),
    (lambda f: (f / "meta.json").unlink(), "meta.json is missing"),
    (_edit_meta(dtype="uint32"), "train.bin holds"),
    (_edit_meta(vocab_size=50257), "vocabulary of 50257"),
    (_edit_meta(tokenizer="gpt2"), "tokenizer"),
], ids=["odd-size", "no-val", "bad-meta", "no-meta", "dtype", "vocab", "tokenizer"])
def test_a_damaged_or_stale_cache_is_refused_naming_the_folder(tmp_path, damage, needle):
    f = tmp_path / "a.txt"
    f.write_text(TEXT)
    folder = prepare(tmp_path, data=str(f))
    damage(folder)
    with pytest.raises(DataError) as e:
        prepare(tmp_path, data=str(f))
    message = str(e.value)
    assert needle in message and str(folder) in message and "delete that folder" in message, message


# --- `datasets` stays optional: the GPU machine has none -------------------------------------------------------
def test_training_on_local_text_needs_no_datasets_package(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT * 3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [f"--data_cache={tmp_path / 'cache'}", "--max_steps=1", "--batch_size=2", "--seq_len=16",
              "--eval_batches=1", "--progress=false", f"--out_dir={tmp_path / 'out'}"]
    run = lambda *a: subprocess.run([*hide_and_run("datasets", str(ROOT / "train.py")), *a], cwd=tmp_path,  # noqa: E731
                                    env=env, capture_output=True, text=True, timeout=300)
    ok = run(f"--data={tmp_path / 'a.txt'}", *common)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    needs = run(f"--dataset={jsonl(tmp_path / 'd.jsonl', [{'text': TEXT}])}", *common)
    assert needs.returncode == 1 and needs.stderr.count("\n") == 1, needs.stderr
    assert "needs the `datasets` package" in needs.stderr
