"""train.py and sample.py under bad input and faults: one clear line, never a lost checkpoint.

- Every bad input (a table per script) ends with exit status 2 (a bad setting) or 1 (anything
  else), exactly one line on stderr starting "train.py: error: " / "sample.py: error: ", no
  traceback, and nothing changed in the run's folder. Most run in process through the scripts'
  own ``run_main`` (fast); a few go through a real subprocess to hold the exit path itself.
- Divergence (--lr=1e3): the run stops with one line naming the step, the last checkpoint is the
  last finite one, and metrics.jsonl is strict JSON.
- kill -9 at each phase of a save (before the renames, between each, after them), injected from
  the test side by a wrapper that patches ``os.replace`` / ``Path.unlink`` in the child process;
  then ``python sample.py`` and ``python train.py --resume`` as subprocesses both work, and the
  resumed losses equal an uninterrupted run's.
- --resume reads and writes only the folder named on the command line (or the default).
"""

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TRAIN, SAMPLE = str(ROOT / "train.py"), str(ROOT / "sample.py")
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
import train  # noqa: E402
from minimamba_moe.run.checkpoint import load_model  # noqa: E402
from minimamba_moe.run.cli import run_main  # noqa: E402
from minimamba_moe.run.tokenizer import TokenizerError, load_tokenizer  # noqa: E402
from tests.helpers import missing_from_extra  # noqa: E402

SMALL = ["--d_model=32", "--n_layer=2", "--d_expert=32", "--seq_len=32", "--eval_batches=1", "--threads=1",
         "--progress=false", "--backend=reference"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def run(script, args, env=None, cwd=None, timeout=300, stdin=None):
    return subprocess.run([sys.executable, script, *args], env={**ENV, **(env or {})}, cwd=cwd, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def records(out_dir):
    """metrics.jsonl, read as strict JSON (a bare NaN or Infinity fails)."""
    def refuse(name):
        raise AssertionError(f"metrics.jsonl holds a bare {name}: not JSON")
    return [json.loads(line, parse_constant=refuse) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir):
    return [r["loss"] for r in records(out_dir) if "loss" in r]


def snapshot(folder):
    """Every file under folder (names and bytes), to show that nothing changed."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line(prog, code, err, want_code, needle):
    err = err.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: ") and needle in err, (needle, err)
    assert code == want_code, (code, err)


def train_a_run(tmp_path_factory, cache, name, steps, eval_interval):
    out = tmp_path_factory.mktemp(name)
    p = run(TRAIN, SMALL + [f"--max_steps={steps}", f"--eval_interval={eval_interval}", f"--out_dir={out}",
                            f"--data_cache={cache}"])
    assert p.returncode == 0, p.stderr
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    return train_a_run(tmp_path_factory, cache, "trained", steps=2, eval_interval=1)


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# --- the bad inputs ------------------------------------------------------------------------------------
def flip_a_byte(path, at=-100):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def edit_config(folder, keep_digest=False, **model):
    meta = json.loads((folder / "config.json").read_text())
    meta["model"].update(model)
    if not keep_digest:
        meta.pop("sha256")
    (folder / "config.json").write_text(json.dumps(meta))


def nan_weights(d):
    """A run folder whose weights hold nan (digests removed, as a hand edit would): never written by a save."""
    from safetensors.torch import save_file
    w = load_file(d / "model.safetensors")
    w[next(iter(w))].fill_(float("nan"))
    save_file(w, d / "model.safetensors", metadata={"format": "1", "step": "2"})
    edit_config(d)


def train_bad_inputs(tmp, trained, cache):
    """(arguments, what stderr must say, exit code, the folder that must not change or None)."""
    def run_copy(name, damage=None):
        folder = copy_run(trained, tmp / name)
        if damage:
            damage(folder)
        return folder
    f = {}
    (tmp / "a_file").write_text("x")
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (tmp / "latin1.txt").write_bytes("déjà vu, garçon, über ".encode("latin-1") * 200)
    (tmp / "tok.json").write_bytes(bytes(range(256)))
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "pattern.json").write_text('{"layer_pattern": 5}')
    (tmp / "latin1.toml").write_bytes("lr = 1e-3 # é\n".encode("latin-1"))
    (tmp / "bad.toml").write_text("lr = = 3\n")
    (tmp / "unknown.toml").write_text("lrate = 3\n")
    (tmp / "with-folder" / "metrics.jsonl").mkdir(parents=True)
    f["existing"] = run_copy("existing")
    cuda = [] if torch.cuda.is_available() else [(["--device=cuda"], "no CUDA GPU is available here", 2)]
    cuda += [] if torch.backends.mps.is_available() else [(["--device=mps"], "--device=mps is not available here", 2)]
    usage = [(a, n, 2) for a, n in [
        (["--batch_size=0"], "--batch_size=0 is out of range: expected an integer >= 1"),
        (["--batch_size=-4"], "--batch_size=-4 is out of range"),
        (["--seq_len=0"], "--seq_len=0 is out of range"),
        (["--eval_interval=0"], "--eval_interval=0 is out of range"),
        (["--grad_accum=-1"], "--grad_accum=-1 is out of range"),
        (["--eval_batches=0"], "--eval_batches=0 is out of range"),
        (["--val_every=0"], "--val_every=0 is out of range"),
        (["--threads=-2"], "--threads=-2 is out of range"),
        (["--threads=100000"], "--threads=100000 is out of range"),  # torch.set_num_threads(50000) segfaults
        (["--out_dir="], "--out_dir is empty"),  # "" would be the current folder
        (["--tokenizer= "], "--tokenizer is empty"),
        (["--lr=-1"], "--lr=-1 is out of range: expected a number > 0"),
        (["--lr=0"], "--lr=0 is out of range"),
        (["--lr=nan"], "--lr=nan: expected a finite number"),
        (["--lr=inf"], "--lr=inf: expected a finite number"),
        (["--lr=fast"], "--lr=fast: expected a number > 0"),
        (["--beta2=1.5"], "--beta2=1.5 is out of range: expected a number in [0, 1)"),
        (["--beta1=-0.1"], "--beta1=-0.1 is out of range"),
        (["--grad_clip=-1"], "--grad_clip=-1 is out of range: expected a number >= 0"),
        (["--max_steps=0"], "--max_steps=0 is out of range"),
        (["--max_steps=-1"], "--max_steps=-1 is out of range"),
        (["--max_steps=2.5"], "--max_steps=2.5: expected an integer"),
        (["--warmup_frac=2"], "--warmup_frac=2 is out of range"),
        (["--seed=-1"], "--seed=-1 is out of range"),
        (["--dtype=float16"], "--dtype=float16 is not allowed: expected one of auto, float32, bfloat16"),
        (["--dtype=foo"], "--dtype=foo is not allowed"),
        (["--on_nonfinite=maybe"], "--on_nonfinite=maybe is not allowed"),
        (["--compile=maybe"], "--compile=maybe: expected true or false"),
        (["--device=tpu"], "--device=tpu is not a device"),
        (["--lrr=1"], "unknown setting --lrr; did you mean --lr?"),
        (["--preset=tinyy"], "--preset=tinyy is not allowed: expected one of tiny"),
        (["--d_model=-3"], "ModelConfig.d_model = -3 is invalid"),
        (["--layer_pattern=mamba,banana"], "ModelConfig.layer_pattern"),
        (["--data=x", "--dataset=y"], "not both"),
        ([str(tmp / "list.json")], "must hold a table of settings"),
        ([str(tmp / "pattern.json")], "layer_pattern = 5: expected a list of names"),
        ([str(tmp / "latin1.toml")], "is not UTF-8 text"),
        ([str(tmp / "bad.toml")], "is not valid TOML"),
        ([str(tmp / "unknown.toml")], "unknown setting --lrate in"),
        ([str(tmp / "missing.toml")], "does not exist"),
        ([str(tmp / "list.json"), str(tmp / "bad.toml")], "unexpected argument"),
        (["--out_dir=" + str(tmp / "a_file" / "out")], "cannot write to --out_dir"),
        (["--preset=transformer-25m", "--tokenizer=bytes", "--vocab_size=256", "--max_seq_len=64", "--seq_len=128"],
         "--seq_len=128 is longer than this Transformer's context max_seq_len=64"),
    ]] + cuda
    # each also aimed at a folder that holds a run: it must be left exactly as it was
    usage = [(a + [f"--out_dir={f['existing']}"] if not any(x.startswith("--out_dir") for x in a) else a, n, c,
              f["existing"]) for a, n, c in usage]
    runtime = [
        (["--data=/no/such/path"], "--data=/no/such/path does not exist", 1, None),
        ([f"--data={tmp / 'empty.txt'}"], "holds no text", 1, None),
        ([f"--data={tmp / 'binary.bin'}"], "is not UTF-8 text", 1, None),
        ([f"--data={tmp / 'latin1.txt'}"], "is not UTF-8 text", 1, None),
        (["--tokenizer=/etc/passwd"], "/etc/passwd is not a tiktoken BPE ranks file", 1, None),
        # a .json tokenizer is read by the `hf` extra: without it, the line says how to install it
        ([f"--tokenizer={tmp / 'tok.json'}"], "is not a Hugging Face tokenizer.json file" if not missing_from_extra("hf")
         else "pip install -e '.[hf]'", 1, None),
        (["--preset=moe-mamba-25m", "--tokenizer=bytes", "--batch_size=4096"],
         "this run needs at least", 1, None),
        (["--resume", f"--out_dir={tmp / 'nothing'}"], "Cannot resume", 1, None),
        (["--d_model=1000000000"], "this model cannot be built", 1, None),  # torch cannot describe its tensors
        (["--vocab_size=10"], "use --vocab_size=256", 2, None),  # a setting that does not fit the tokenizer: usage
        (["--out_dir=" + str(tmp / "with-folder")], "metrics.jsonl is a folder", 2, None),
        (["--resume", f"--out_dir={trained}", "--d_model=64"], "does not match the checkpoint", 1, trained),
        (["--resume", f"--out_dir={trained}", "--preset=mamba-25m"], "--preset=mamba-25m does not match", 1, trained),
    ]
    damaged = {
        "edited": (lambda d: edit_config(d, d_model=64), "do not match the config"),
        "edited-with-digest": (lambda d: edit_config(d, keep_digest=True, d_model=64), "does not match the SHA-256"),
        "flipped-weights": (lambda d: flip_a_byte(d / "model.safetensors"), "model.safetensors does not match the SHA-256"),
        "flipped-state": (lambda d: flip_a_byte(d / "train_state.pt", at=len((d / "train_state.pt").read_bytes()) // 2),
                          "train_state.pt"),
        "latin1-config": (lambda d: (d / "config.json").write_bytes((d / "config.json").read_bytes() + "é".encode("latin-1")),
                          "is not UTF-8 text"),
        "state-missing-key": (lambda d: torch.save({k: v for k, v in torch.load(d / "train_state.pt", weights_only=True)
                                                    .items() if k != "rng_cpu"}, d / "train_state.pt"),
                              "is not a complete training state: it lacks rng_cpu"),
        "nan-weights": (nan_weights, "model.safetensors hold nan or inf values"),
    }
    runtime = [(a if any(x.startswith("--out_dir") for x in a) else a + [f"--out_dir={tmp / 'fresh'}"], n, c, d)
               for a, n, c, d in runtime]
    for name, (damage, needle) in damaged.items():
        folder = run_copy(name, damage)
        runtime.append((["--resume", f"--out_dir={folder}"], needle, 1, folder))
    return usage + runtime


def test_train_bad_inputs_get_one_line_and_change_nothing(tmp_path, trained, cache, capsys):
    cases = train_bad_inputs(tmp_path, trained, cache)
    for args, needle, code, folder in cases:
        before = snapshot(folder) if folder else None
        got = run_main(train.main, [*args, f"--data_cache={cache}", "--progress=false"], "train.py",
                       train.USAGE_ERRORS, train.ERRORS)
        err = capsys.readouterr().err
        assert_one_line("train.py", got, err, code, needle)
        if folder:
            assert snapshot(folder) == before, f"{args} changed {folder}"
        if "/etc/passwd" in args[0]:
            assert "root" not in err  # the file's content is not echoed
    print(f"train.py: {len(cases)} bad inputs, each one line")


@pytest.mark.needs_extra("hf")
def test_a_json_file_that_is_not_a_tokenizer_is_named_not_quoted(tmp_path):
    """With the `hf` extra the .json is parsed: a file that is not a tokenizer.json gets that sentence (the
    test above asks train.py for it where the extra is installed, and for the install line where not)."""
    bad = tmp_path / "tok.json"
    bad.write_bytes(b'{"secret": "do not echo"}' + bytes(range(256)))
    with pytest.raises(TokenizerError, match=r"tok\.json is not a Hugging Face tokenizer\.json file") as e:
        load_tokenizer(str(bad))
    assert "secret" not in str(e.value)


def test_train_errors_through_the_real_exit_path(tmp_path, cache):
    """A few of the above as people meet them: a subprocess, its exit status, its stderr."""
    cases = [
        (["--batch_size=0"], {}, "--batch_size=0 is out of range", 2),
        (["--lrr=1"], {}, "did you mean --lr?", 2),
        (["--dataset=someone/no-such-dataset"], OFFLINE, "Could not load the hub dataset", 1),
        (["--tokenizer=gpt2"], {**OFFLINE, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")}, "--tokenizer=path/to/gpt2.tiktoken", 1),
    ]
    for args, env, needle, code in cases:
        p = run(TRAIN, [*args, f"--out_dir={tmp_path / 'elsewhere'}", f"--data_cache={cache}"], env=env, timeout=120)
        assert_one_line("train.py", p.returncode, p.stderr, code, needle)
    p = run(TRAIN, ["--batch_size=0", "--debug"], cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" in p.stderr  # --debug: the traceback
    assert not (tmp_path / "out").exists()


# --- divergence -------------------------------------------------------------------------------------
def test_divergence_stops_at_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cache):
    out = tmp_path / "run"
    p = run(TRAIN, SMALL + ["--lr=1e3", "--warmup_frac=0", "--max_steps=30", "--eval_interval=100", "--ckpt_interval=1",
                            f"--out_dir={out}", f"--data_cache={cache}"])
    steps = [r for r in records(out) if "loss" in r]  # strict JSON: nan written as null
    bad = next(r for r in steps if r["loss"] is None or r["grad_norm"] is None)
    assert_one_line("train.py", p.returncode, p.stderr, 1, f"step {bad['step']}: the loss is")
    assert f"the last checkpoint in {out} is step {bad['step'] - 1}'s" in p.stderr
    assert bad["skipped"] and steps[-1] is bad
    model, meta = load_model(out)
    assert bad["step"] > 1 and meta["step"] == bad["step"] - 1  # the last good step's, never the diverged weights
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    # with --on_nonfinite=skip the run goes on, skipping those batches
    p = run(TRAIN, SMALL + ["--lr=1e3", "--warmup_frac=0", "--max_steps=4", "--eval_interval=100", "--on_nonfinite=skip",
                            f"--out_dir={tmp_path / 'skip'}", f"--data_cache={cache}"])
    skipped = [r for r in records(tmp_path / "skip") if r.get("skipped")]
    assert (p.returncode == 0 and skipped) or "validation loss is nan" in p.stderr, p.stderr
    # diverged before any save: it says so (not "the checkpoints are from earlier steps")
    p = run(TRAIN, SMALL + ["--lr=1e3", "--warmup_frac=0", "--max_steps=30", "--eval_interval=1",
                            f"--out_dir={tmp_path / 'none'}", f"--data_cache={cache}"])
    assert p.returncode == 1 and "this run has written no checkpoint to" in p.stderr, p.stderr


# --- where --resume reads and writes -----------------------------------------------------------------
def test_resume_writes_only_the_folder_it_read(tmp_path, trained, cache):
    """A copy of a run resumed by its default name (no --out_dir) continues in the copy, not the original."""
    original = copy_run(trained, tmp_path / "original")
    p = run(TRAIN, SMALL + ["--max_steps=1", f"--out_dir={original}", f"--data_cache={cache}"])
    assert p.returncode == 0, p.stderr
    work = tmp_path / "work"
    copy_run(original, work / "out")  # out = the default out_dir
    before = snapshot(original)
    p = run(TRAIN, ["--resume", "--max_steps=3", f"--data_cache={cache}"], cwd=work)
    assert p.returncode == 0, p.stderr
    assert snapshot(original) == before
    assert load_model(work / "out")[1]["step"] == 3 and [r["step"] for r in records(work / "out") if "loss" in r] == [1, 2, 3]


def test_resume_drops_a_torn_last_metrics_line(tmp_path, trained, cache):
    folder = copy_run(trained, tmp_path / "run")
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.1')  # a kill in the middle of a line
    p = run(TRAIN, ["--resume", "--max_steps=3", f"--out_dir={folder}", f"--data_cache={cache}"])
    assert p.returncode == 0, p.stderr
    assert [r["step"] for r in records(folder) if "loss" in r] == [1, 2, 3]


# --- kill -9 at each phase of a save -----------------------------------------------------------------
KILLER = """
import os, runpy, signal, sys
from pathlib import Path
renames_before_kill = int(sys.argv.pop(1))  # of the second save: 0, 1, 2 (between renames) or 3 (after them)
names = {"model.safetensors", "train_state.pt", "config.json"}
done = [0]
real_replace, real_unlink = os.replace, Path.unlink
def replace(src, dst, *a, **k):
    if Path(dst).name in names:
        if done[0] == 3 + renames_before_kill:
            os.kill(os.getpid(), signal.SIGKILL)
        done[0] += 1
    return real_replace(src, dst, *a, **k)
def unlink(self, *a, **k):
    if self.name.endswith(".prev") and done[0] == 6:  # the second save renamed all three: clean-up time
        os.kill(os.getpid(), signal.SIGKILL)
    return real_unlink(self, *a, **k)
os.replace, Path.unlink = replace, unlink
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    return train_a_run(tmp_path_factory, cache, "straight", steps=4, eval_interval=2)


def hard_link_copy(src, dst):
    """A copy whose files are hard links of the originals, as the .prev links are (os.samefile holds)."""
    dst.mkdir()
    for f in src.iterdir():
        os.link(f, dst / f.name)


@pytest.mark.parametrize("renames_before_kill", [0, 1, 2, 3], ids=["before-renames", "after-1", "after-2", "after-3"])
def test_kill_at_each_phase_of_a_save_then_resume_and_sample(tmp_path, cache, straight, renames_before_kill):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", KILLER, str(renames_before_kill), TRAIN, *SMALL, "--max_steps=4",
                        "--eval_interval=2", f"--out_dir={out}", f"--data_cache={cache}"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert [f for f in out.iterdir() if f.name.endswith((".tmp", ".prev"))], "the kill left no trace of the save"
    for_sampling = tmp_path / "sample-me"
    hard_link_copy(out, for_sampling)
    # sample.py on the interrupted folder: it undoes the save itself, then loads a whole checkpoint
    s = run(SAMPLE, [str(for_sampling), "--max_new_tokens", "5", "--prompt", "def "])
    assert s.returncode == 0, s.stderr
    assert load_model(for_sampling)[1]["step"] == (4 if renames_before_kill == 3 else 2)
    # train.py --resume on the other copy: its own start-up recovers, then it finishes the run
    r = run(TRAIN, ["--resume", f"--out_dir={out}", f"--data_cache={cache}"])
    assert r.returncode == 0, r.stderr
    assert losses(out) == losses(straight)  # floats from JSON: equal means bitwise equal
    a, b = load_file(out / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [f for f in out.iterdir() if f.name.endswith((".tmp", ".prev"))]


def test_no_test_hook_in_production_code():
    for script in (TRAIN, SAMPLE, ROOT / "minimamba_moe" / "run" / "checkpoint.py"):
        text = Path(script).read_text()
        assert "MINIMAMBA_TEST" not in text and "sleep(" not in text, script


# --- sample.py ---------------------------------------------------------------------------------------
def sample_bad_inputs(tmp, trained):
    def folder(name, damage):
        d = copy_run(trained, tmp / name)
        damage(d)
        return str(d)

    (tmp / "latin1.txt").write_bytes("é".encode("latin-1"))
    ckpt = str(trained)
    cuda = [] if torch.cuda.is_available() else [([ckpt, "--device", "cuda"], None, "no CUDA GPU is available", 2)]
    mps = [] if torch.backends.mps.is_available() else [([ckpt, "--device", "mps"], None, "--device mps is not available here", 2)]
    return [  # (arguments, standard input bytes, what stderr must say, exit code)
        ([ckpt, "--temperature", "nan"], None, "finite --temperature", 2),
        ([ckpt, "--temperature", "-1"], None, "finite --temperature", 2),
        ([ckpt, "--top_p", "0"], None, "0 < --top_p <= 1", 2),
        ([ckpt, "--top_k", "-1"], None, "--top_k >= 0", 2),
        ([ckpt, "--threads", "-2"], None, "--threads -2", 2),
        ([ckpt, "--threads", "100000"], None, "--threads 100000: expected 0 (auto) or a number of threads up to", 2),
        ([ckpt, "--num_samples", "0"], None, "at least 1", 2),
        ([ckpt, "--max_new_tokens", "0"], None, "at least 1", 2),
        ([ckpt, "--max_new_tokens", "many"], None, "invalid int value", 2),
        ([ckpt, "--bogus"], None, "unrecognized arguments: --bogus", 2),
        ([ckpt, "--dtype", "foo"], None, "invalid choice", 2),
        ([ckpt, "--device", "tpu0"], None, "is not a device name", 2),
        ([ckpt, "--prompt", "x", "--prompt_file", "y"], None, "not both", 2),
        ([ckpt, "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")], None, "--prompt is not UTF-8", 1),
        ([ckpt, "--prompt_file", str(tmp / "latin1.txt")], None, "latin1.txt is not UTF-8", 1),
        ([ckpt], b"caf\xe9", "the standard input is not UTF-8", 1),
        ([ckpt, "--tokenizer", "/etc/passwd"], None, "is not a tiktoken BPE ranks file", 1),
        ([folder("nan", nan_weights)], None, "model.safetensors hold nan or inf values", 1),
        ([ckpt, "--seed", "-1"], None, "--seed -1: expected an integer from 0", 2),
        ([ckpt, "--seed", str(2**64)], None, "expected an integer from 0 to 2**63 - 1", 2),
        ([folder("huge", lambda d: edit_config(d, n_layer=20_000_000))], None, "this run needs at least", 1),
        ([folder("flipped", lambda d: flip_a_byte(d / "model.safetensors"))], None, "does not match the SHA-256", 1),
        ([folder("latin1", lambda d: (d / "config.json").write_bytes(b"\xe9"))], None, "is not UTF-8 text", 1),
        ([folder("list", lambda d: (d / "config.json").write_text("[1]"))], None, "expected a JSON object", 1),
        ([folder("sha", lambda d: (d / "config.json").write_text('{"sha256": "x"}'))], None, "expected a JSON object", 1),
        ([folder("no-model", lambda d: (d / "config.json").write_text("{}"))], None, "it lacks the field 'model'", 1),
    ] + cuda + mps


def test_sample_bad_inputs_get_one_line(tmp_path, trained, capsys, monkeypatch):
    cases = sample_bad_inputs(tmp_path, trained)
    for args, stdin, needle, code in cases:
        fake = io.TextIOWrapper(io.BytesIO(stdin if stdin is not None else b""), encoding="utf-8")
        fake.isatty = (lambda: False) if stdin is not None else (lambda: True)
        monkeypatch.setattr(sys, "stdin", fake)
        got = run_main(sample.main, [*args, "--max_new_tokens", "3"] if "--max_new_tokens" not in args else args,
                       "sample.py", (sample.UsageError,), sample.ERRORS)
        assert_one_line("sample.py", got, capsys.readouterr().err, code, needle)
    print(f"sample.py: {len(cases)} bad inputs, each one line")


def test_library_loader_names_a_damaged_file(tmp_path, trained):
    from minimamba_moe.run.checkpoint import CheckpointError
    folder = copy_run(trained, tmp_path / "flipped")
    flip_a_byte(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors does not match the SHA-256"):
        load_model(folder)
    assert math.isfinite(load_model(trained)[0].embedding.weight.sum().item())  # the undamaged one loads
