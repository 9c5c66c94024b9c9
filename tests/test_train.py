"""train.py, run as people run it: in subprocesses, on small settings, on the CPU.

Every run here trains a 2-layer, d_model=32 version of the tiny preset on the Python standard
library's sources (tokenized once per test session into a shared cache) with the reference kernels
and one thread, so runs are deterministic. What is compared:

- resume: N steps, stop, resume to 2N == 2N steps straight, bitwise (losses and final weights);
- 2 processes (gloo, DDP and FSDP2) with batch b each == 1 process with batch 2b, and
  k micro-batches of b == one batch of k*b: losses within 1e-5 (float32 sums in another order).
  These use the Switch router without capacity limit or aux loss, whose routing of a token does not
  depend on the other tokens of its batch. Sinkhorn (the tiny preset's router) balances over the
  local batch, so splitting a batch over processes or micro-batches changes the routing: that is the
  algorithm (BlackMamba balances per device batch too), not a bug, and it is not compared here.
- a kill -9 between writing a checkpoint's temporary files and renaming them leaves the previous
  checkpoint loadable, and the run resumes from it;
- each kind of bad input exits non-zero with one clear line on stderr and no traceback.

Settings parsing, the schedule and the data cache are tested in process (no subprocess).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "train.py")
sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (train.py is importable: its work happens under __main__)
from minimamba_moe.checkpoint import load_model  # noqa: E402

SMALL = ["--d_model=32", "--n_layer=2", "--d_expert=32", "--seq_len=32", "--eval_batches=1", "--threads=1",
         "--progress=false", "--backend=reference"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def run(args, cache, env=None, cwd=None, check=True, timeout=300):
    cmd = [sys.executable, TRAIN, *args] if args[:1] != ["-m"] else [sys.executable, *args]
    p = subprocess.run(cmd + [f"--data_cache={cache}"], env={**ENV, **(env or {})}, cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def losses(out_dir):
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def weights(out_dir):
    return load_file(Path(out_dir) / "model.safetensors")


def test_quick_start_writes_a_loadable_checkpoint(tmp_path, cache):
    """`python train.py` with its defaults (tiny preset, stdlib corpus, bytes), cut to 3 steps."""
    run(["--max_steps=3", "--out_dir=out"], cache, cwd=tmp_path)
    model, meta = load_model(tmp_path / "out")
    assert meta["tokenizer"] == "bytes" and meta["step"] == 3
    assert model.config.name == "tiny" and model.config.vocab_size == 256
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(len(r["tokens_per_expert"]) == 2 and len(r["tokens_per_expert"][0]) == 4 for r in steps)
    assert all(sum(r["tokens_per_expert"][0]) == 8 * 128 for r in steps)  # tiny: batch 8 x 128 tokens, top-1
    assert any("val_loss" in r for r in records)


def test_resume_continues_bitwise(tmp_path, cache):
    straight, halves = str(tmp_path / "straight"), str(tmp_path / "halves")
    run(SMALL + ["--max_steps=6", "--eval_interval=2", f"--out_dir={straight}"], cache)
    run(SMALL + ["--max_steps=3", "--decay_steps=6", "--eval_interval=2", f"--out_dir={halves}"], cache)
    run(["--resume", "--max_steps=6", f"--out_dir={halves}"], cache)
    assert len(losses(straight)) == 6
    assert losses(halves) == losses(straight)  # floats from JSON: equal means bitwise equal
    a, b = weights(straight), weights(halves)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SWITCH = SMALL + ["--router=switch", "--aux_loss_coef=0", "--max_steps=4", "--eval_interval=2"]


@pytest.fixture(scope="module")
def one_process_batch_4(tmp_path_factory, cache):
    out = str(tmp_path_factory.mktemp("single"))
    run(SWITCH + ["--batch_size=4", f"--out_dir={out}"], cache)
    return out


def assert_same_run(a, b, tol=1e-5):
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 4
    assert la == pytest.approx(lb, rel=tol, abs=tol)
    wa, wb = weights(a), weights(b)
    assert all(torch.allclose(wa[k], wb[k], rtol=tol, atol=tol) for k in wa)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, cache, one_process_batch_4, mode):
    out = str(tmp_path / mode)
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN]
    run(args + SWITCH + ["--batch_size=2", f"--out_dir={out}"] + (["--fsdp"] if mode == "fsdp" else []), cache)
    assert_same_run(one_process_batch_4, out)


def test_grad_accumulation_matches_a_bigger_batch(tmp_path, cache, one_process_batch_4):
    out = str(tmp_path / "accum")
    run(SWITCH + ["--batch_size=1", "--grad_accum=4", f"--out_dir={out}"], cache)
    assert_same_run(one_process_batch_4, out)


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path, cache):
    out = tmp_path / "run"
    args = [sys.executable, TRAIN, *SMALL, "--max_steps=4", "--eval_interval=2", f"--out_dir={out}",
            f"--data_cache={cache}"]
    p = subprocess.Popen(args, env={**ENV, "MINIMAMBA_TEST_HANG_IN_SAVE_AT_STEP": "4"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:  # wait until the step-4 checkpoint sits in temporary files
            if "hanging before the renames" in line:
                break
        else:
            pytest.fail(f"the run ended (rc {p.wait()}) without reaching the save hook")
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    assert list(out.glob(".*.tmp")), "the kill should have left the step-4 temporary files"
    model, meta = load_model(out)
    assert meta["step"] == 2
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()][-1] >= 3
    run(["--resume", f"--out_dir={out}"], cache)
    _, meta = load_model(out)
    assert meta["step"] == 4 and not list(out.glob(".*.tmp"))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # the killed run's steps 3, 4 were dropped


OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("trained")
    run(SMALL + ["--max_steps=1", f"--out_dir={out}"], cache)
    return out


def bad_inputs(tmp, trained):
    a_file = tmp / "a_file"
    a_file.write_text("x")
    edited = tmp / "edited"
    edited.mkdir()
    for f in ("model.safetensors", "train_state.pt", "config.json"):
        (edited / f).write_bytes((trained / f).read_bytes())
    meta = json.loads((edited / "config.json").read_text())
    meta["model"]["d_model"] = 64
    (edited / "config.json").write_text(json.dumps(meta))
    read_only = tmp / "read_only"
    read_only.mkdir(mode=0o500)
    return [  # (arguments, extra environment, what stderr must say, exit code)
        (["--lrr=1"], {}, "unknown setting --lrr; did you mean --lr?", 2),
        (["--max_steps=2.5"], {}, "--max_steps=2.5: expected an integer", 2),
        (["--preset=tinyy"], {}, "Unknown preset 'tinyy'. Did you mean tiny?", 1),
        (["--d_model=-3"], {}, "ModelConfig.d_model = -3 is invalid", 1),
        (["--data=/no/such/path"], {}, "--data=/no/such/path does not exist", 1),
        (["--dataset=someone/no-such-dataset"], OFFLINE, "Could not load the hub dataset", 1),
        (["--tokenizer=gpt2"], {**OFFLINE, "TIKTOKEN_CACHE_DIR": str(tmp / "empty")}, "--tokenizer=path/to/gpt2.tiktoken", 1),
        ([f"--out_dir={a_file}/out"], {}, "cannot write to --out_dir", 2),
        (["--resume", f"--out_dir={tmp / 'nothing'}"], {}, "Cannot resume", 1),
        (["--resume", f"--out_dir={trained}", "--d_model=64"], {}, "does not match the checkpoint", 1),
        (["--resume", f"--out_dir={edited}"], {}, "do not match the config", 1),
        (["--resume", f"--out_dir={trained}", "--preset=mamba-25m"], {}, "--preset=mamba-25m does not match", 1),
    ] + ([(["--out_dir=" + str(read_only / "out")], {}, "cannot write to --out_dir", 2)]
         if os.geteuid() != 0 else [])  # root writes anywhere: the not-a-folder case above stands in


def test_bad_inputs_get_one_clear_line(tmp_path, cache, trained):
    for args, env, message, code in bad_inputs(tmp_path, trained):
        p = run(["--progress=false", *args], cache, env=env, check=False, timeout=120)
        err = p.stderr.strip()
        assert p.returncode == code, (args, p.returncode, err)
        assert "Traceback" not in err, (args, err)
        assert err.splitlines()[-1].startswith("train.py: error: ") and message in err, (args, err)
        assert len(err.splitlines()) == 1, (args, err)


# --- settings, in process ------------------------------------------------------------------------
def test_settings_are_typed_and_layered(tmp_path):
    cfg, model = train.configure(["--lr", "1e-3", "--max_steps=7", "--compile", "--d_model=64",
                                  "--layer_pattern=mamba,moe", "--capacity_factor=None"])
    assert (cfg["lr"], cfg["max_steps"], cfg["compile"]) == (1e-3, 7, True)
    assert model == {"d_model": 64, "layer_pattern": ("mamba", "moe"), "capacity_factor": None}
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 2e-4\nbatch_size = 3\nn_experts = 8\n')
    cfg, model = train.configure([str(toml), "--batch_size=5"])  # the command line wins over the file
    assert (cfg["lr"], cfg["batch_size"], model) == (2e-4, 5, {"n_experts": 8})
    cfg, _ = train.configure(["--preset=moe-mamba-25m"])  # per-preset training defaults (SPEC §3)
    assert (cfg["lr"], cfg["tokenizer"], cfg["seq_len"], cfg["grad_clip"], cfg["weight_decay"]) == (5e-4, "gpt2", 1024, 0.5, 0.1)
    toml.write_text('batch_size = "big"\n')
    with pytest.raises(train.UsageError, match="batch_size = 'big': expected int"):
        train.configure([str(toml)])
    with pytest.raises(train.UsageError, match="did you mean --n_experts"):
        train.configure(["--n_expert=3"])


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = dict(lr=1.0, min_lr_ratio=0.1, warmup_frac=0.1, decay_steps=0, max_steps=100)
    lrs = [train.lr_at(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[99] == pytest.approx(0.1, abs=1e-3) and lrs[119] == pytest.approx(0.1)


def test_help_lists_every_setting(capsys):
    train.main(["--help"])
    text = capsys.readouterr().out
    for key in list(train.SETTINGS) + list(train.MODEL_FIELDS):
        assert f"--{key}=" in text
    assert "--lr=0.003 " in text and "--d_model=128 " in text
    train.main(["--help", "--preset=moe-mamba-25m"])  # that preset's defaults
    text = capsys.readouterr().out
    assert "--lr=0.0005 " in text and "--d_model=512 " in text and "--n_experts=42 " in text


# --- data, in process ----------------------------------------------------------------------------
def test_local_text_folder_is_tokenized_once(tmp_path):
    from minimamba_moe.data import prepare_data
    from minimamba_moe.tokenizer import load_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"document {i}: " + "lorem ipsum " * 50 for i in range(10)]
    for i, d in enumerate(docs):
        (corpus / f"{i:02d}.txt").write_text(d)
    said = []
    folder = prepare_data(load_tokenizer("bytes"), "bytes", data=str(corpus), cache_dir=str(tmp_path / "c"),
                          val_every=5, log=said.append)
    meta = json.loads((folder / "meta.json").read_text())
    sizes = [len(d.encode()) for d in docs]
    assert meta["dtype"] == "uint16" and meta["tokens"] == {"train": sum(sizes) - sizes[4] - sizes[9], "val": sizes[4] + sizes[9]}
    assert (folder / "train.bin").stat().st_size == 2 * meta["tokens"]["train"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    said.clear()
    assert prepare_data(load_tokenizer("bytes"), "bytes", data=str(corpus), cache_dir=str(tmp_path / "c"),
                        val_every=5, log=said.append) == folder and said == []  # second run: straight from the cache
    (corpus / "00.txt").write_text("changed")  # a changed corpus gets a new cache
    assert prepare_data(load_tokenizer("bytes"), "bytes", data=str(corpus), cache_dir=str(tmp_path / "c"),
                        val_every=5, log=said.append) != folder


def test_local_dataset_file_with_gpt2_ranks(tmp_path):
    from minimamba_moe.data import DataError, prepare_data
    from minimamba_moe.tokenizer import load_tokenizer

    ranks = Path("/work/shared/data/gpt2.tiktoken")
    if not ranks.is_file():
        pytest.skip("no offline GPT-2 ranks file")
    tok = load_tokenizer(str(ranks))
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"hello world number {i}"}) + "\n" for i in range(20)))
    folder = prepare_data(tok, str(ranks), dataset=str(f), cache_dir=str(tmp_path / "c"), val_every=10, log=lambda *a: None)
    train_ids = np.fromfile(folder / "train.bin", dtype=np.uint16)
    first = tok.encode("hello world number 0") + [tok.eot_token]
    assert train_ids[: len(first)].tolist() == first  # documents end with <|endoftext|>
    with pytest.raises(DataError, match="has no field 'content'"):
        prepare_data(tok, str(ranks), dataset=str(f), text_field="content", cache_dir=str(tmp_path / "c"), log=lambda *a: None)


def test_batches_split_one_global_batch_over_micro_batches_and_ranks(tmp_path):
    from minimamba_moe.data import Batches, prepare_data
    from minimamba_moe.tokenizer import load_tokenizer

    corpus = tmp_path / "t.txt"
    corpus.write_text("".join(chr(97 + i % 26) for i in range(5000)))
    folder = prepare_data(load_tokenizer("bytes"), "bytes", data=str(corpus), cache_dir=str(tmp_path / "c"), log=lambda *a: None)
    b = Batches(folder, "train", seq_len=16, seed=3)
    x_all, y_all = b.get(step=7, batch_size=8)
    assert torch.equal(x_all[:, 1:], y_all[:, :-1])  # y is x shifted by one
    parts = [b.get(7, 2, micro, 2, rank, 2)[0] for micro in range(2) for rank in range(2)]
    assert torch.equal(torch.cat(parts), x_all)
    assert not torch.equal(b.get(8, 8)[0], x_all)  # another step, other windows
