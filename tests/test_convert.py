"""The Zyphra (released BlackMamba) converter, held against a forward pass written here from the math.

The synthetic checkpoint has the released key layout (docs/paper-facts.md#released-checkpoints) at a tiny size, bf16, saved as
``{"model": state_dict}`` like pytorch_model.bin. ``reference_logits`` below reads those same
tensors and computes the logits with its own loops (RMSNorm, causal conv, selective scan over
time, sigmoid-argmax routing, gate/up halves of linear_fc1, final LayerNorm, tied head), sharing no
code with minimamba_moe.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minimamba_moe.config import ModelConfig
from minimamba_moe.run.checkpoint import load_model, save_model
from minimamba_moe.interop.convert import (
                                           ConversionError,
                                           convert_zyphra,
                                           infer_config,
                                           load_zyphra,
                                           load_zyphra_state_dict,
                                           zyphra_shapes,
                                           )
from tests.helpers import byte_level_bpe_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, N_LAYER, D_INNER, D_STATE, DT_RANK, N_EXPERTS, FFN, ROWS = 32, 4, 64, 16, 2, 4, 48, 320


def synthetic_zyphra(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny BlackMamba state dict in the released layout and dtype (bf16), written key by key."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g) * std + mean).to(torch.bfloat16)

    sd = {"embedding.word_embeddings.weight": randn(ROWS, D, std=0.5)}
    for i in range(N_LAYER):
        p = f"decoder.layers.{i}."
        sd[p + "norm.weight"] = randn(D, std=0.1, mean=1.0)
        if i % 2 == 0:
            m = p + "mixer."
            dt = torch.exp(torch.rand(D_INNER, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            sd[m + "in_proj.weight"] = randn(2 * D_INNER, D, std=D**-0.5)
            sd[m + "conv1d.weight"] = randn(D_INNER, 1, 4, std=0.5)
            sd[m + "conv1d.bias"] = randn(D_INNER, std=0.1)
            sd[m + "x_proj.weight"] = randn(DT_RANK + 2 * D_STATE, D_INNER, std=D_INNER**-0.5)
            sd[m + "dt_proj.weight"] = randn(D_INNER, DT_RANK, std=DT_RANK**-0.5)
            sd[m + "dt_proj.bias"] = (dt + torch.log(-torch.expm1(-dt))).to(torch.bfloat16)
            sd[m + "A_log"] = (torch.log(torch.arange(1, D_STATE + 1.0)).expand(D_INNER, D_STATE)
                               + 0.1 * torch.randn(D_INNER, D_STATE, generator=g)).to(torch.bfloat16)
            sd[m + "D"] = randn(D_INNER, std=0.1, mean=1.0)
            sd[m + "out_proj.weight"] = randn(D, D_INNER, std=D_INNER**-0.5)
        else:
            m = p + "mixer."
            sd[m + "router.weight"] = randn(N_EXPERTS, D, std=3 * D**-0.5)
            sd[m + "router.bias"] = randn(N_EXPERTS, std=0.5)
            for e in range(N_EXPERTS):
                sd[m + f"local_experts.{e}.linear_fc1.weight"] = randn(2 * FFN, D, std=D**-0.5)
                sd[m + f"local_experts.{e}.linear_fc2.weight"] = randn(D, FFN, std=FFN**-0.5)
    sd["decoder.final_layernorm.weight"] = randn(D, std=0.1, mean=1.0)
    sd["decoder.final_layernorm.bias"] = randn(D, std=0.1)
    return sd


# ------------------------------------------------------------------------------------------------
# An independent forward pass, one sequence at a time, in float64 from the stored numbers.
# ------------------------------------------------------------------------------------------------
def ref_mamba(h, W, p):
    xz = h @ W[p + "in_proj.weight"].T
    x, z = xz[:, :D_INNER], xz[:, D_INNER:]  # (l, di)
    w, b = W[p + "conv1d.weight"][:, 0, :], W[p + "conv1d.bias"]  # (di, 4)
    L, K = x.shape[0], w.shape[1]
    u = torch.zeros_like(x)
    for t in range(L):  # causal: output t sees inputs t-3..t, the oldest with w[:, 0]
        acc = b.clone()
        for k in range(K):
            s = t - (K - 1) + k
            if s >= 0:
                acc = acc + w[:, k] * x[s]
        u[t] = acc * torch.sigmoid(acc)
    dbc = u @ W[p + "x_proj.weight"].T
    dt_low, B, C = dbc[:, :DT_RANK], dbc[:, DT_RANK:DT_RANK + D_STATE], dbc[:, DT_RANK + D_STATE:]
    delta = F.softplus(dt_low @ W[p + "dt_proj.weight"].T + W[p + "dt_proj.bias"])  # (l, di)
    A = -torch.exp(W[p + "A_log"])  # (di, n)
    state = torch.zeros(D_INNER, D_STATE, dtype=h.dtype)
    y = torch.zeros_like(u)
    for t in range(L):
        state = torch.exp(delta[t][:, None] * A) * state + delta[t][:, None] * B[t][None, :] * u[t][:, None]
        y[t] = state @ C[t] + W[p + "D"] * u[t]
    y = y * (z * torch.sigmoid(z))
    return y @ W[p + "out_proj.weight"].T


def ref_moe(h, W, p, act, chosen):
    logits = h @ W[p + "router.weight"].T + W[p + "router.bias"]  # (l, E)
    gate_values = torch.sigmoid(logits)
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        e = int(gate_values[t].argmax())
        chosen.append(e)
        a = W[p + f"local_experts.{e}.linear_fc1.weight"] @ h[t]  # (2 ffn,)
        gate, up = a[:FFN], a[FFN:]
        g = F.gelu(gate) if act == "geglu" else gate * torch.sigmoid(gate)
        out[t] = gate_values[t, e] * (W[p + f"local_experts.{e}.linear_fc2.weight"] @ (g * up))
    return out


def reference_logits(sd, ids, act="geglu", chosen=None):
    """ids (b, l) -> logits (b, l, ROWS) in float64."""
    W = {k: v.double() for k, v in sd.items()}
    emb = W["embedding.word_embeddings.weight"]
    chosen = [] if chosen is None else chosen
    rows = []
    for seq in ids:
        x = emb[seq]  # (l, d)
        for i in range(N_LAYER):
            p = f"decoder.layers.{i}."
            h = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * W[p + "norm.weight"]
            x = x + (ref_mamba(h, W, p + "mixer.") if i % 2 == 0 else ref_moe(h, W, p + "mixer.", act, chosen))
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        x = (x - mu) / torch.sqrt(var + 1e-5) * W["decoder.final_layernorm.weight"] + W["decoder.final_layernorm.bias"]
        rows.append(x @ emb.T)
    return torch.stack(rows)


@pytest.fixture(scope="module")
def zyphra_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("zyphra") / "pytorch_model.bin"
    torch.save({"model": synthetic_zyphra()}, path)
    return path


def test_converted_logits_match_independent_forward(zyphra_file):
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    sd = load_zyphra_state_dict(zyphra_file)
    for act in ("geglu", "swiglu"):
        chosen = []
        expected = reference_logits(sd, ids, act, chosen)
        assert len(set(chosen)) >= 3, "the test should route tokens to several experts"
        model = convert_zyphra(sd, activation=act, dtype=torch.float32)
        got = model(ids).logits
        assert got.shape == (2, 10, ROWS)
        err = (got.double() - expected).abs().max().item()
        assert err < 1e-3, f"{act}: max abs logit error {err:.2e} (logit scale {expected.abs().max():.1f})"
    # the flag matters: GeGLU and SwiGLU weights give different models
    geglu, swiglu = reference_logits(sd, ids, "geglu"), reference_logits(sd, ids, "swiglu")
    assert (geglu - swiglu).abs().max() > 1e-2


def test_default_conversion_is_geglu_bf16_with_fp32_A_log_and_D(zyphra_file):
    model = load_zyphra(zyphra_file)
    assert model.config.mlp_activation == "geglu"  # what the released inference code runs
    assert not model.training
    assert model.lm_head.weight is model.embedding.weight
    for name, p in model.named_parameters():
        want = torch.float32 if name.endswith(("A_log", ".D")) else torch.bfloat16
        assert p.dtype == want, f"{name}: {p.dtype}"
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(2))
    expected = reference_logits(load_zyphra_state_dict(zyphra_file), ids)
    got = model(ids).logits.double()
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 0.05, f"bf16 logits relative error {rel:.3f}"


def test_stored_numbers_arrive_unchanged(zyphra_file):
    sd = load_zyphra_state_dict(zyphra_file)
    model = convert_zyphra(sd)
    w1, w2 = model.layers[3].mixer.w1, model.layers[3].mixer.w2
    assert torch.equal(w1[2], sd["decoder.layers.3.mixer.local_experts.2.linear_fc1.weight"])
    assert torch.equal(w2[1], sd["decoder.layers.3.mixer.local_experts.1.linear_fc2.weight"])
    assert torch.equal(model.layers[2].mixer.A_log, sd["decoder.layers.2.mixer.A_log"].float())
    assert torch.equal(model.final_norm.bias, sd["decoder.final_layernorm.bias"])


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda sd: sd.__setitem__("decoder.layers.2.mixer.xproj.weight", sd.pop("decoder.layers.2.mixer.x_proj.weight")),
         ["missing decoder.layers.2.mixer.x_proj.weight", "decoder.layers.2.mixer.xproj.weight"]),
        (lambda sd: sd.__setitem__("decoder.layers.3.mixer.local_experts.1.linear_fc2.weight",
                                   sd["decoder.layers.3.mixer.local_experts.1.linear_fc2.weight"][:, :40]),
         ["decoder.layers.3.mixer.local_experts.1.linear_fc2.weight", "(32, 40)", "(32, 48)"]),
        (lambda sd: sd.pop("decoder.layers.1.mixer.local_experts.3.linear_fc1.weight"),
         ["missing decoder.layers.1.mixer.local_experts.3.linear_fc1.weight"]),
        (lambda sd: sd.__setitem__("decoder.final_layernorm.weight", torch.ones(D + 1)),
         ["decoder.final_layernorm.weight", "(33,)", "(32,)"]),
        (lambda sd: sd.pop("embedding.word_embeddings.weight"), ["missing embedding.word_embeddings.weight"]),
    ],
    ids=["renamed", "reshaped", "missing-expert", "final-norm-shape", "no-embedding"],
)
def test_mismatching_layout_is_refused_naming_the_difference(edit, needle):
    sd = synthetic_zyphra()
    edit(sd)
    with pytest.raises(ConversionError) as e:
        convert_zyphra(sd)
    for s in needle:
        assert s in str(e.value), str(e.value)


def test_reports_matching_preset():
    for name in ("blackmamba-1.5b", "blackmamba-2.8b"):
        shapes = zyphra_shapes(ModelConfig.from_preset(name))
        sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}  # shapes only, no memory
        config = infer_config(sd, vocab_size=50277)
        assert config.name == name and config.padded_vocab_size == 50304 and config.vocab_size == 50277
    assert infer_config(synthetic_zyphra()).name == "custom"


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(ConversionError, match="No Zyphra checkpoint"):
        load_zyphra_state_dict(tmp_path / "nope.bin")
    good = tmp_path / "good.bin"
    torch.save({"model": synthetic_zyphra()}, good)
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ConversionError, match="truncated or damaged"):
        load_zyphra_state_dict(bad)
    evil = tmp_path / "object.bin"
    torch.save({"model": {"x": torch.zeros(1)}, "args": ModelConfig()}, evil)  # an arbitrary object
    with pytest.raises(ConversionError, match="minimamba_moe.config.ModelConfig"):
        load_zyphra_state_dict(evil)


def test_saved_conversion_loads_as_our_checkpoint(zyphra_file, tmp_path):
    model = load_zyphra(zyphra_file, dtype=torch.float32)
    save_model(model, tmp_path / "ckpt", tokenizer="bytes")
    loaded, extra = load_model(tmp_path / "ckpt")
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    assert extra["tokenizer"] == "bytes"
    assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)


@pytest.mark.needs_extra("hf")
def test_sample_py_zyphra_end_to_end(zyphra_file, tmp_path):
    """sample.py --zyphra with a GPT-NeoX-style (byte-level BPE) tokenizer.json, then the saved checkpoint."""
    tok_path = byte_level_bpe_tokenizer(tmp_path / "tokenizer.json")
    common = ["--prompt", "the cat", "--max_new_tokens", "6", "--temperature", "0", "--dtype", "float32"]
    run = lambda *a: subprocess.run([sys.executable, "sample.py", *a, *common], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    first = run("--zyphra", str(zyphra_file), "--tokenizer", str(tok_path), "--save_converted", str(tmp_path / "c"))
    assert first.returncode == 0, first.stderr
    assert "custom" in first.stderr and "geglu" in first.stderr
    assert first.stdout.startswith("the cat") and len(first.stdout) > len("the cat")
    second = run("--ckpt", str(tmp_path / "c"))
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    again = run("--zyphra", str(zyphra_file), "--tokenizer", str(tok_path), "--save_converted", str(tmp_path / "c"))
    assert again.returncode == 1 and again.stderr.count("\n") == 1, again.stderr  # one line, the folder untouched
    assert "already holds a checkpoint" in again.stderr and not again.stdout
    assert run("--ckpt", str(tmp_path / "c")).stdout == first.stdout


def test_stored_tokenizer_spec(tmp_path, monkeypatch):
    from minimamba_moe.interop.convert import stored_tokenizer_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert stored_tokenizer_spec("bytes") == "bytes"  # a name stays a name
    assert stored_tokenizer_spec("tokenizer.json") == str(tmp_path / "tokenizer.json")  # a file: absolute


# --- malformed files: one ConversionError sentence each, nothing written ----------------------------------------
def _set(key, value):
    return lambda sd: sd.__setitem__(key, value)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (_set("decoder.layers.0.mixer.A_log", torch.zeros(D_INNER * D_STATE)), "A_log: shape (1024,) in the file"),
        (_set("embedding.word_embeddings.weight", torch.zeros(ROWS)), "embedding.word_embeddings.weight: shape (320,)"),
        (_set("decoder.layers.0.mixer.conv1d.weight", torch.zeros(D_INNER, 4)), "conv1d.weight: shape (64, 4)"),
        (_set("embedding.word_embeddings.weight", torch.zeros(ROWS, 0)), "d_model = 0"),
        (_set("decoder.layers.1.mixer.router.weight", torch.zeros(0, D)), "n_experts = 0"),
        (_set("decoder.layers.0.mixer.A_log", torch.zeros(D_INNER, D_STATE, dtype=torch.int64)), "A_log: dtype torch.int64"),
        (_set("decoder.layers.2.mixer.in_proj.weight", torch.full((2 * D_INNER, D), float("nan"))), "in_proj.weight holds nan"),
    ],
    ids=["1d-A_log", "1d-embedding", "2d-conv", "zero-width", "zero-experts", "int-dtype", "nan"],
)
def test_malformed_tensors_are_refused_in_one_sentence(edit, needle):
    sd = synthetic_zyphra()
    edit(sd)
    with pytest.raises(ConversionError) as e:
        convert_zyphra(sd)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def test_files_that_are_not_checkpoints_get_a_sentence_saying_what_they_are(tmp_path, recwarn):
    text = tmp_path / "notes.bin"
    text.write_text("hello, this is not a checkpoint\n")
    with pytest.raises(ConversionError, match="not a PyTorch checkpoint") as e:
        load_zyphra_state_dict(text)
    assert "KeyError" not in str(e.value) and "101" not in str(e.value)
    import pickle

    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"model": {"x": _RunsCode()}}))
    zipped = tmp_path / "zipped.bin"
    torch.save({"model": {"x": torch.zeros(1)}, "hook": _RunsCode()}, zipped)
    for path in (raw, zipped):
        with pytest.raises(ConversionError, match="could run arbitrary code") as e:
            load_zyphra_state_dict(path)
        assert "weights_only` set to `False`" not in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert "posix.system" in str(e.value) or "os.system" in str(e.value), str(e.value)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)], "torch's warning would be a second line"


def test_a_safetensors_file_is_read_by_safetensors_on_any_torch(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    save_file(synthetic_zyphra(), tmp_path / "model.safetensors")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reads .safetensors only on torch >= 2.13"))
    sd = load_zyphra_state_dict(tmp_path / "model.safetensors")
    assert convert_zyphra(sd).config.n_layer == N_LAYER
    half = tmp_path / "half.safetensors"
    half.write_bytes((tmp_path / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ConversionError, match="damaged or not a safetensors file"):
        load_zyphra_state_dict(half)


def convert_main(*args):
    from minimamba_moe.interop.convert import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return None


def test_out_folder_holding_a_checkpoint_or_a_file_is_refused_before_reading(zyphra_file, tmp_path, monkeypatch):
    import minimamba_moe.interop.convert as convert

    monkeypatch.setattr(convert, "load_zyphra", lambda *a, **k: pytest.fail("the weights were read first"))
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "train_state.pt", "metrics.jsonl"):
        (run / name).write_text("a training run's file")
    code = convert_main(zyphra_file, "--tokenizer", "bytes", "--out", run)
    assert "already holds a checkpoint" in code and "\n" not in code, code
    assert all((run / n).read_text() == "a training run's file" for n in ("config.json", "train_state.pt"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is a file" in convert_main(zyphra_file, "--tokenizer", "bytes", "--out", a_file)


def test_conversion_writes_all_or_nothing(zyphra_file, tmp_path, monkeypatch):
    import minimamba_moe.run.checkpoint as checkpoint

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "config_text", disk_full)  # the weights are written, then config.json fails
    code = convert_main(zyphra_file, "--tokenizer", "bytes", "--out", tmp_path / "new")
    assert "No space left on device" in code and "\n" not in code, code
    assert sorted(os.listdir(tmp_path)) == [], "a half-written checkpoint (or a temporary folder) was left behind"
    monkeypatch.undo()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "README").write_text("mine")
    assert convert_main(zyphra_file, "--tokenizer", "bytes", "--out", tmp_path / "shared") is None
    assert sorted(os.listdir(tmp_path / "shared")) == ["README", "config.json", "model.safetensors"]
    assert load_model(tmp_path / "shared")[0].config.n_layer == N_LAYER
