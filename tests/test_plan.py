"""minimamba_moe/run/plan.py: a hand count on a small config, the activation estimate against the tensors
the model really saves for its backward, and a 2.8B plan made without allocating it."""

import resource

import pytest
import torch
import torch.nn.functional as F

from minimamba_moe import Model, ModelConfig
from minimamba_moe.flops import flops_per_token
from minimamba_moe.run.memory import layer_activation_bytes
from minimamba_moe.run.plan import format_plan, make_plan, mfu

# d_model 64, d_inner 128, d_state 16, dt_rank 4, d_conv 4; 4 SwiGLU experts of 128; vocab 256; tied
SMALL = dict(d_model=64, n_layer=2, layer_pattern=("mamba", "moe"), n_experts=4, d_expert=128, vocab_size=256)


def test_hand_count():
    config = ModelConfig.from_preset("tiny", **SMALL)
    p = make_plan(config, batch_size=2, seq_len=32, grad_accum=3, nproc=4, fsdp=True, bf16=True)
    embedding = 256 * 64
    # norm, in_proj, conv w + b, x_proj, dt_proj w + b, A_log, D, out_proj
    mamba = 64 + 64 * 256 + 128 * 4 + 128 + 128 * 36 + 4 * 128 + 128 + 128 * 16 + 128 + 128 * 64
    # norm, router w + b, w1 (4, 256, 64), w2 (4, 64, 128)
    moe = 64 + 64 * 4 + 4 + 4 * 256 * 64 + 4 * 64 * 128
    total = embedding + mamba + moe + 2 * 64  # + the final LayerNorm
    assert (mamba, moe, total) == (32704, 98628, 147844)
    assert p.params_total == total
    assert p.params_active == total - 3 * (256 * 64 + 64 * 128)  # 3 of 4 experts idle per token
    assert p.largest_layer == moe
    assert p.tokens_per_step == 2 * 32 * 3 * 4
    # fp32 weights, grads, AdamW moments over 4 shards; the MoE layer gathered in bf16 for compute
    m = p.memory()
    assert m["weights"] == m["gradients"] == total + 2 * moe
    assert m["optimizer"] == 2 * total
    # activations per token, bf16: a block keeps 4*64 (fp32 input) + 2*64 (norm output)
    mamba_act = 384 + 2 * (9 * 128 + 4 + 2 * 16)  # 2760
    moe_act = 384 + 4 * (64 + 4) + 2 * (64 + 256 + 128)  # 1552
    head = 4 * 64 + 2 * 64 + 3 * 4 * 256  # 3456
    assert m["activations"] == (mamba_act + moe_act + head) * 64
    assert p.memory(checkpointing=True)["activations"] == (2 * 4 * 64 + mamba_act + head) * 64
    assert p.memory(sharded=False)["optimizer"] == 8 * total
    assert m["total"] == sum(m[k] for k in ("weights", "gradients", "optimizer", "activations"))
    f = flops_per_token(config, 32, training=True).total
    assert p.flops_per_token == f
    assert p.step_seconds == pytest.approx(768 * f / (4 * 989e12 * 0.4), rel=1e-12)


def saved_bytes_per_token(config, b=2, l=64):
    """Bytes of the tensors autograd saves for the backward (not the parameters), per token, fp32."""
    torch.manual_seed(0)
    model = Model(config)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    ids = torch.randint(0, config.vocab_size, (b, l))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten())
    return sum(n for ptr, n in storages.items() if ptr not in params) / (b * l)


@pytest.mark.parametrize("kind", ["mamba", "moe", "attention", "mlp"])
def test_layer_activations_match_what_the_model_saves(kind):
    """One more layer of ``kind`` adds what layer_activation_bytes says, within 15% (fp32, CPU kernels)."""
    kw = dict(d_model=64, layer_pattern=(kind,), n_experts=4, d_expert=128, d_ff=256, vocab_size=64)
    one, two = (ModelConfig.from_preset("tiny", n_layer=n, **kw) for n in (1, 2))
    measured = saved_bytes_per_token(two) - saved_bytes_per_token(one)
    estimate = layer_activation_bytes(one, kind, 4)
    assert estimate == pytest.approx(measured, rel=0.15), f"estimate {estimate} vs measured {measured} bytes/token"


def test_a_large_plan_allocates_nothing():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    p = make_plan(ModelConfig.from_preset("blackmamba-2.8b"), 4, 2048, 16, nproc=8, activation_checkpointing=True)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: far below 11 GB
    assert 2.7e9 < p.params_total < 2.9e9
    text = format_plan(p)
    for words in ("parameters", "tokens per step", "FLOPs per token", "weights", "gradients", "optimizer",
                  "activations", "checkpointed", "DDP", "time per step", "989", "40% MFU"):
        assert words in text
    assert p.memory(sharded=True)["total"] < p.memory(sharded=False)["total"]
    assert p.memory(checkpointing=True)["activations"] < p.memory(checkpointing=False)["activations"]


def test_train_py_plan_prints_without_building(capsys, tmp_path):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import train
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train.main(["--preset=blackmamba-2.8b", "--plan", "--nproc=8", "--fsdp", "--activation_checkpointing",
                "--peak_tflops=500", "--mfu=0.5", f"--out_dir={tmp_path / 'out'}"])
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000
    text = capsys.readouterr().out
    p = make_plan(ModelConfig.from_preset("blackmamba-2.8b"), 4, 2048, 16, nproc=8, activation_checkpointing=True,
                  peak_tflops=500, mfu=0.5)
    assert text.strip() == format_plan(p)
    assert "8 processes, FSDP2" in text and "50% MFU of 500 TFLOP/s" in text
    assert not (tmp_path / "out").exists()  # nothing written


def test_logged_mfu_is_model_flops_over_the_peak():
    config = ModelConfig.from_preset("blackmamba-1.5b")
    per_token = flops_per_token(config, 2048, training=True).total
    assert mfu(config, 2048, 100_000.0, 989.0) == pytest.approx(100_000 * per_token / 989e12, rel=1e-12)
    p = make_plan(config, 8, 2048, 8, nproc=8, mfu=0.35)  # the plan's step time gives back its stated MFU
    assert mfu(config, 2048, p.tokens_per_step / p.step_seconds / 8, 989.0) == pytest.approx(0.35, rel=1e-12)
