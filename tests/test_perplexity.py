"""python -m minimamba_moe.interop.perplexity: loss, perplexity and bits per byte over local text, held to a
direct computation written here: every token's negative log-likelihood from its own forward pass over exactly
the tokens its window lets it see (a stride of 1: the last ``context`` tokens; a stride equal to the context:
the tokens since its disjoint window began). The model is the small trained checkpoint of tests/conftest.py;
both sides run it in float32 (1e-5 relative on the mean loss).
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from minimamba_moe.interop import perplexity
from minimamba_moe.run.checkpoint import load_model
from minimamba_moe.run.cli import run_main

TEXTS = {"a.txt": "the cat sat on the mat. the dog sat on the log. the cat sat on the mat.",
         "sub/b.txt": "naïve dog sat — on the log.", "c.txt": "", ".hidden": "left out"}


@pytest.fixture
def corpus(tmp_path):
    for name, text in TEXTS.items():
        (tmp_path / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "corpus" / name).write_text(text, encoding="utf-8")
    return tmp_path / "corpus"


def run(*args, capsys):
    code = run_main(perplexity.main, [*args, "--progress", "false"], perplexity.PROG, (perplexity.UsageError,),
                    perplexity.ERRORS)
    out = capsys.readouterr()
    return code, out.out, out.err


@torch.no_grad()
def direct_nll(model, text: str, context: int, disjoint: bool) -> float:
    seq = [10] + list(text.encode("utf-8"))  # the byte tokenizer's prefix token is the newline
    total = 0.0
    for j in range(1, len(seq)):  # target seq[j], predicted from the inputs its window holds
        start = ((j - 1) // context) * context if disjoint else max(0, j - context)
        logits = model(torch.tensor([seq[start:j]])).logits[0, -1].double()
        total -= float(F.log_softmax(logits, dim=-1)[seq[j]])
    return total


@pytest.mark.parametrize("stride", [1, 16], ids=["stride-1", "disjoint"])
def test_perplexity_equals_a_direct_computation(trained_ckpt, corpus, capsys, stride, one_thread):
    code, out, err = run(str(trained_ckpt), "--data", str(corpus), "--context", "16", "--stride", str(stride),
                         "--batch_size", "3", "--device", "cpu", capsys=capsys)
    assert code == 0, err
    model, _ = load_model(trained_ckpt)
    texts = [TEXTS["a.txt"], TEXTS["c.txt"], TEXTS["sub/b.txt"]]  # sorted paths; .hidden left out, c.txt empty
    nll = sum(direct_nll(model.eval(), t, 16, disjoint=stride == 16) for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    header, numbers = out.strip().splitlines()
    assert header.startswith(f"{corpus}: 3 files, {n_bytes} tokens, {n_bytes} bytes;") and f"stride {stride}" in header
    loss, ppl, bpb = map(float, re.findall(r"[\d.]+(?= nats/token)|(?<=perplexity )[\d.]+|(?<=bits per byte )[\d.]+",
                                           numbers))
    assert loss == pytest.approx(nll / n_bytes, rel=1e-4, abs=1e-4)  # printed to 4 decimals
    assert ppl == pytest.approx(math.exp(nll / n_bytes), rel=1e-3)
    assert bpb == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4, abs=1e-4)


def test_default_window_and_stride_and_the_result_in_full(trained_ckpt, one_thread):
    """Default: the model's context (max_seq_len 64) and half of it; evaluate() returns every count and sum."""
    model, tok = perplexity.load_pretrained(str(trained_ckpt), torch.device("cpu"), torch.float32)
    text = TEXTS["a.txt"] * 2  # 142 bytes: windows at 0, 32, 64, 96 (the last one reaches the end)
    assert list(perplexity.windows(len(text), 64, 32)) == [(0, 64, 0), (32, 96, 64), (64, 128, 96), (96, 142, 128)]
    r = perplexity.evaluate(model, tok, [text], 64, 32, 2, "cpu", progress=False)
    assert (r["tokens"], r["bytes"], r["windows"]) == (142, 142, 4)
    assert r["loss"] == pytest.approx(r["nll"] / 142) and r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["loss"] < 1.5, "the trained model knows these sentences"


@pytest.mark.parametrize("make, args, code, needle", [
    (None, ["--data", "{tmp}/missing.txt"], 1, "--data {tmp}/missing.txt: no such file or folder."),
    (lambda d: (d / "bad.txt").write_bytes(b"caf\xe9"), ["--data", "{tmp}/bad.txt"], 1, "bad.txt is not UTF-8 text"),
    (lambda d: (d / "empty.txt").write_text(""), ["--data", "{tmp}/empty.txt"], 1, "The text is empty"),
    (lambda d: (d / "a.txt").write_text("x"), ["--data", "{tmp}/a.txt", "--context", "8", "--stride", "9"], 2,
     "--stride 9 is larger than --context 8"),
    (lambda d: (d / "a.txt").write_text("x"), ["--data", "{tmp}/a.txt", "--dtype", "float8"], 2, "--dtype float8"),
], ids=["missing", "not-utf8", "empty", "stride", "dtype"])
def test_bad_input_one_line(trained_ckpt, tmp_path, capsys, make, args, code, needle):
    if make:
        make(tmp_path)
    got, out, err = run(str(trained_ckpt), *[a.format(tmp=tmp_path) for a in args], capsys=capsys)
    assert got == code and not out, err
    assert err.count("\n") == 1 and err.startswith(f"{perplexity.PROG}: error: ") and needle.format(tmp=tmp_path) in err


def test_needs_no_eval_extra():
    """The perplexity command stands on its own: neither it nor what it imports reaches lm_eval (the `eval` extra)."""
    from tests.test_structure import GRAPH, MODULES

    reached, todo = set(), ["minimamba_moe.interop.perplexity"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += GRAPH.get(name, [])
    assert "minimamba_moe.interop.harness" not in reached
    assert not [n for n in reached if n in MODULES and "lm_eval" in MODULES[n].read_text(encoding="utf-8")]
