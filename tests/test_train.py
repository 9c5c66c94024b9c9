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
- the logged gradient norm of k micro-batches of b == that of one batch of k*b;
- the optimizer's no-decay group is exactly the 1-D tensors and A_log (norms, biases, D, dt bias).

Settings parsing, the schedule and the data cache are tested in process (no subprocess). Bad input,
faults (kill -9 during a save, divergence) and the memory guard: tests/test_train_faults.py.
"""

import json
import os
import re
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
from minimamba_moe.run.checkpoint import load_model  # noqa: E402
from minimamba_moe.run.settings import FIELDS, MODEL_FIELDS, TrainSettings, UsageError, configure  # noqa: E402

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
    p = run(["--max_steps=3", "--out_dir=out", "--log_interval=1"], cache, cwd=tmp_path)
    assert "\r" not in p.stdout and "step 3/3: loss" in p.stdout  # not a terminal: plain lines, no progress bar
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


def grad_norms(out_dir):
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in records if "loss" in r]


def assert_same_run(a, b, tol=1e-5):
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 4
    assert la == pytest.approx(lb, rel=tol, abs=tol)
    ga, gb = grad_norms(a), grad_norms(b)
    assert ga == pytest.approx(gb, rel=tol, abs=tol), f"grad norms {ga} vs {gb}"
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


# --- settings, in process ------------------------------------------------------------------------
def test_settings_are_typed_and_layered(tmp_path):
    cfg, model = configure(["--lr", "1e-3", "--max_steps=7", "--compile", "--d_model=64",
                            "--layer_pattern=mamba,moe", "--capacity_factor=None", "--batch-size=3"])
    assert (cfg.lr, cfg.max_steps, cfg.compile, cfg.batch_size) == (1e-3, 7, True, 3)
    assert model == {"d_model": 64, "layer_pattern": ("mamba", "moe"), "capacity_factor": None}
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 2e-4\nbatch_size = 3\nn_experts = 8\n')
    cfg, model = configure([str(toml), "--batch_size=5"])  # the command line wins over the file
    assert (cfg.lr, cfg.batch_size, model) == (2e-4, 5, {"n_experts": 8})
    cfg, _ = configure(["--preset=moe-mamba-25m"])  # per-preset training defaults (docs/paper-facts.md)
    assert (cfg.lr, cfg.tokenizer, cfg.seq_len, cfg.grad_clip, cfg.weight_decay) == (5e-4, "gpt2", 1024, 0.5, 0.1)
    toml.write_text('batch_size = "big"\n')
    with pytest.raises(UsageError, match="batch_size = 'big': expected an integer"):
        configure([str(toml)])
    with pytest.raises(UsageError, match="did you mean --n_experts"):
        configure(["--n_expert=3"])
    saved = dict(vars(TrainSettings(lr=0.25, out_dir="/somewhere/else")), model={"d_model": 64})
    cfg, model = configure(["--resume", "--max_steps=9"], saved=saved)  # a saved run: its settings, yours on top
    assert (cfg.lr, cfg.max_steps, cfg.out_dir, model) == (0.25, 9, "out", {})  # never its out_dir


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainSettings(lr=1.0, min_lr_ratio=0.1, warmup_frac=0.1, decay_steps=0, max_steps=100)
    lrs = [train.lr_at(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[99] == pytest.approx(0.1, abs=1e-3) and lrs[119] == pytest.approx(0.1)


def help_entry(text, key):
    """The help of --key: from its option to the next option."""
    return " ".join(re.search(rf"\n  --{key} .*?(?=\n  -)", text, re.S).group(0).split())


def test_help_lists_every_setting(capsys):
    train.main(["--help"])
    text = capsys.readouterr().out
    for key in list(FIELDS) + list(MODEL_FIELDS):
        assert f"\n  --{key} " in text, key
    assert "(default: 0.003)" in help_entry(text, "lr") and "(default: 128)" in help_entry(text, "d_model")
    assert "[a number > 0]" in help_entry(text, "lr") and "one of stop, skip" in help_entry(text, "on_nonfinite")
    train.main(["--help", "--preset=moe-mamba-25m"])  # that preset's defaults
    text = capsys.readouterr().out
    assert "(default: 0.0005)" in help_entry(text, "lr") and "(default: 512)" in help_entry(text, "d_model")
    assert "(default: 42)" in help_entry(text, "n_experts")
    assert "SETTINGS" not in Path(TRAIN).read_text() and "read_text().split" not in Path(TRAIN).read_text()


# --- laws of the optimizer's parameter groups -------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "moe-mamba-25m", "transformer-moe-25m"])
def test_no_decay_group_is_exactly_norms_biases_A_log_D_and_dt_bias(preset):
    from minimamba_moe import Model, ModelConfig

    config = ModelConfig.from_preset(preset, d_model=32, n_layer=2, n_experts=2, d_expert=16, d_ff=32, n_head=2,
                                     vocab_size=64)
    model = Model(config)
    decay, no_decay = train.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)] for p in no_decay["params"]}
    # the intended set, by what each parameter is (not by its shape, which is how param_groups decides)
    norms = {f"{name}.{k}" for name, m in model.named_modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))
             for k in ("weight", "bias") if getattr(m, k, None) is not None}
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    ssm = {n for n, _ in model.named_parameters() if n.endswith((".A_log", ".D", "dt_proj.bias"))}
    assert got == norms | biases | ssm, f"extra: {got - (norms | biases | ssm)}, missing: {(norms | biases | ssm) - got}"
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - got
    if "mamba" in config.layer_kinds:
        assert any(n.endswith("A_log") for n in got) and any(n.endswith(".D") for n in got)


# --- data, in process ----------------------------------------------------------------------------
def test_local_text_folder_is_tokenized_once(tmp_path):
    from minimamba_moe.run.data import prepare_data
    from minimamba_moe.run.tokenizer import load_tokenizer

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
    from minimamba_moe.run.data import DataError, prepare_data
    from minimamba_moe.run.tokenizer import load_tokenizer

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
    from minimamba_moe.run.data import Batches, prepare_data
    from minimamba_moe.run.tokenizer import load_tokenizer

    corpus = tmp_path / "t.txt"
    corpus.write_text("".join(chr(97 + i % 26) for i in range(5000)))
    folder = prepare_data(load_tokenizer("bytes"), "bytes", data=str(corpus), cache_dir=str(tmp_path / "c"), log=lambda *a: None)
    b = Batches(folder, "train", seq_len=16, seed=3)
    x_all, y_all = b.get(step=7, batch_size=8)
    assert torch.equal(x_all[:, 1:], y_all[:, :-1])  # y is x shifted by one
    parts = [b.get(7, 2, micro, 2, rank, 2)[0] for micro in range(2) for rank in range(2)]
    assert torch.equal(torch.cat(parts), x_all)
    assert not torch.equal(b.get(8, 8)[0], x_all)  # another step, other windows
