"""FSDP2 on the meta device and DCP checkpoints (minimamba_moe/run/distributed.py), on 2 CPU processes with gloo.

Laws:
- init: for 1 and 2 processes, the full tensors of ``build_model(config, seed)`` are bitwise those of
  ``torch.manual_seed(seed); Model(config)``;
- memory: building a ~60M-parameter model sharded over 2 processes raises each one's peak RSS by
  well under the model's fp32 size (the full model is never allocated);
- training: 2 sharded processes (with activation checkpointing) on halves of a batch give the
  losses of 1 unsharded process on the whole batch, step by step;
- resume: a DCP checkpoint written by the 2 processes, loaded into 1 plain process, continues with
  the losses the 2 processes had; the weights streamed to safetensors (gathered one tensor at a
  time, or read from the DCP folder in one process) are the training's weights;
- train.py: ``torchrun --nproc_per_node=2 train.py --fsdp --activation_checkpointing`` for 3 steps,
  then ``train.py --resume`` in 1 process to step 6, has the losses of 6 steps straight (1e-5); the
  sharded run leaves a model.safetensors that load_model reads (digest checked), the same as the
  export command writes; a damaged state.json is one error line. (Slow: the other way round, a
  1-process checkpoint resumed by 2 FSDP processes.)
"""

import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file

from minimamba_moe import Model, ModelConfig
from minimamba_moe.run.checkpoint import CheckpointError, load_model
from minimamba_moe.run.distributed import (build_model, checkpoint_activations, device_mesh, export_sharded,
                                           export_weights, load_sharded, save_sharded, stored_names)

SEED = 7
# switch routing without capacity or aux loss: each token's output depends on it alone, so a batch
# split over processes has the loss and gradient of the whole batch (Sinkhorn balances per process).
CONFIGS = {
    "blackmamba": dict(),
    "switch": dict(router="switch", aux_loss_coef=0.0, norm="layernorm", final_norm="none", tie_embeddings=False),
    "attention": dict(layer_pattern=("attention", "mlp"), router="switch"),
}
TRAIN = dict(router="switch", aux_loss_coef=0.0)
BIG = dict(d_model=384, n_layer=32, n_experts=8, d_expert=768, vocab_size=1024)  # 129M parameters, 516 MB
STEPS, SAVE_AT, BATCH, SEQ = 6, 3, 4, 32


def batch(step):
    """Rows counting up by 1 or 2 from random starts: learnable in a few steps."""
    g = torch.Generator().manual_seed(1000 + step)
    start, stride = torch.randint(0, 256, (BATCH, 1), generator=g), torch.randint(1, 3, (BATCH, 1), generator=g)
    ids = (start + stride * torch.arange(SEQ + 1)) % 256
    return ids[:, :-1], ids[:, 1:]


def train(model, optimizer, steps, rank=0, world=1):
    """Losses of the whole batch at each step, each process taking its rows."""
    losses = []
    for step in steps:
        x, y = (t.chunk(world)[rank] for t in batch(step))
        loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)  # SUM, then divide: gloo has no ReduceOp.AVG in torch 2.6 and 2.7
            loss /= world
        losses.append(loss.item())
    return losses


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mesh = device_mesh("cpu")
    result = {}
    # init law
    result["init_equal"] = {}
    for name, kw in CONFIGS.items():
        config = ModelConfig.from_preset("tiny", **kw)
        sd = build_model(config, SEED, "cpu", mesh).state_dict()
        torch.manual_seed(SEED)
        ref = Model(config).state_dict()
        result["init_equal"][name] = [k for k, v in ref.items() if not torch.equal(v, sd[k].full_tensor())]
    # memory: the rise of the peak RSS (VmHWM) over what the small models above took
    big = ModelConfig.from_preset("tiny", **BIG)
    before = peak_rss()
    model = build_model(big, SEED, "cpu", mesh)
    result["rss_increase"] = peak_rss() - before
    result["local_bytes"] = sum(p.to_local().numel() * 4 for p in model.parameters())
    del model
    # training, a checkpoint half-way, the weights exported
    config = ModelConfig.from_preset("tiny", **TRAIN)
    model = build_model(config, SEED, "cpu", mesh, activation_checkpointing=True)
    optimizer = adamw(model)
    result["losses"] = train(model, optimizer, range(SAVE_AT), rank, world)
    save_sharded(f"{out}/sharded", model, optimizer, {"step": SAVE_AT})
    result["losses"] += train(model, optimizer, range(SAVE_AT, STEPS), rank, world)
    export_weights(model, f"{out}/exported.safetensors")
    # bf16 compute with fp32 reduction: one step close to the fp32 one
    model = build_model(config, SEED, "cpu", mesh, bf16=True)
    result["bf16_loss"] = train(model, adamw(model), range(1), rank, world)[0]
    if rank == 0:
        with open(f"{out}/result.json", "w") as f:
            json.dump(result, f)
    # Free what holds the process group (FSDP modules hold it through reference cycles) while the
    # interpreter is alive: left to interpreter shutdown, gloo's threads aborted the process now and then.
    del model, optimizer, mesh
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, str(out)), nprocs=2)
    return out, json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_init_is_the_unsharded_models(name):
    config = ModelConfig.from_preset("tiny", **CONFIGS[name])
    torch.manual_seed(SEED)
    ref = Model(config)
    model = build_model(config, SEED, "cpu")
    assert model.state_dict().keys() == ref.state_dict().keys()
    bad = [k for k, v in ref.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert not bad, f"differ from Model(config): {bad}"
    assert (model.lm_head.weight is model.embedding.weight) == config.tie_embeddings


def test_init_is_the_unsharded_models_on_two_processes(two_processes):
    _, r = two_processes
    assert r["init_equal"] == {name: [] for name in CONFIGS}


def test_each_process_holds_well_under_the_full_model(two_processes):
    _, r = two_processes
    with torch.device("meta"):
        model = Model(ModelConfig.from_preset("tiny", **BIG))
    full_bytes = sum(p.numel() for p in model.parameters()) * 4
    unit_bytes = max(sum(p.numel() for p in m.parameters()) * 4 for m in [*model.layers, model.embedding])
    assert full_bytes > 400e6
    assert r["local_bytes"] == pytest.approx(full_bytes / 2, rel=0.01)
    # its shard, plus the one unit (a layer, or the embedding) held whole while it is drawn
    shown = f"peak RSS rose {r['rss_increase'] / 1e6:.0f} MB on rank 0; the full model is {full_bytes / 1e6:.0f} MB"
    assert r["rss_increase"] < r["local_bytes"] + unit_bytes + 32e6, shown  # + allocator slack (seen up to 20 MB)
    assert r["rss_increase"] < 0.7 * full_bytes, shown


@pytest.fixture(scope="module")
def unsharded_losses():
    config = ModelConfig.from_preset("tiny", **TRAIN)
    model = build_model(config, SEED, "cpu")
    return train(model, adamw(model), range(STEPS)), model


def test_two_sharded_processes_train_as_one(two_processes, unsharded_losses):
    _, r = two_processes
    want, _ = unsharded_losses
    diff = max(abs(a - b) for a, b in zip(r["losses"], want))
    assert diff < 1e-4, f"losses {r['losses']} vs unsharded {want}: max diff {diff:.2e}"
    assert want[-1] < want[0] - 0.1  # it trains
    assert abs(r["bf16_loss"] - want[0]) < 0.05


def test_two_process_checkpoint_resumes_in_one(two_processes):
    out, r = two_processes
    config = ModelConfig.from_preset("tiny", **TRAIN)
    model = build_model(config, SEED + 1, "cpu")  # other weights: the checkpoint must replace them
    optimizer = adamw(model)
    state = load_sharded(out / "sharded", model, optimizer)
    assert state == {"step": SAVE_AT}
    losses = train(model, optimizer, range(SAVE_AT, STEPS))
    diff = max(abs(a - b) for a, b in zip(losses, r["losses"][SAVE_AT:]))
    assert diff < 1e-4, f"resumed {losses} vs 2 processes {r['losses'][SAVE_AT:]}: max diff {diff:.2e}"


def test_exported_weights_are_the_trained_ones(two_processes, tmp_path):
    out, _ = two_processes
    config = ModelConfig.from_preset("tiny", **TRAIN)
    exported = load_file(out / "exported.safetensors")
    model = Model(config)
    assert list(exported) == stored_names(model)
    model.load_state_dict(exported, strict=False)
    # the DCP folder read one tensor at a time (no process group) gives the step-SAVE_AT weights
    export_sharded(out / "sharded", config, tmp_path / "w.safetensors", {"step": SAVE_AT})
    at_save = load_file(tmp_path / "w.safetensors")
    check = build_model(config, SEED, "cpu")
    load_sharded(out / "sharded", check, adamw(check))
    assert all(torch.equal(at_save[k], check.state_dict()[k]) for k in at_save)
    assert not all(torch.equal(at_save[k], exported[k]) for k in at_save)  # 3 more steps moved them


def test_activation_checkpointing_gives_the_same_gradients():
    config = ModelConfig.from_preset("tiny", **CONFIGS["blackmamba"])
    plain, ckpt = build_model(config, SEED, "cpu"), build_model(config, SEED, "cpu", activation_checkpointing=True)
    x, y = batch(0)
    for m in (plain, ckpt):
        F.cross_entropy(m(x).logits.flatten(0, 1), y.flatten()).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_activations_keeps_parameter_names():
    config = ModelConfig.from_preset("tiny")
    with torch.device("meta"):
        model = Model(config)
    names = [n for n, _ in model.named_parameters()]
    checkpoint_activations(model)
    assert [n for n, _ in model.named_parameters()] == names


# --- train.py --fsdp under torchrun: sharded checkpoints, resumed in one process, exported ------------------
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
RUN = ["--d_model=32", "--n_layer=2", "--d_expert=32", "--seq_len=32", "--eval_batches=1", "--threads=1",
       "--progress=false", "--backend=reference", "--router=switch", "--aux_loss_coef=0", "--eval_interval=2",
       "--decay_steps=6"]


def run(*args, nproc=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    p = subprocess.run([sys.executable, *launcher, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_train_py_fsdp_checkpoint_resumes_in_one_process(tmp_path):
    """2 sharded processes (batch 2 each) for 3 steps, then 1 process (batch 4) to step 6 from their
    DCP checkpoint == 1 process for 6 steps; the sharded run leaves what sample.py reads."""
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train = [str(ROOT / "train.py"), *RUN, f"--data_cache={tmp_path / 'cache'}"]
    run(*train, "--batch_size=4", "--max_steps=6", f"--out_dir={straight}")
    run(*train, "--batch_size=2", "--max_steps=3", "--fsdp", "--activation_checkpointing", f"--out_dir={halves}", nproc=2)
    assert sorted(p.name for p in (halves / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (halves / "train_state.pt").exists()
    _, meta = load_model(halves)  # the weights at step 3, digest checked
    assert meta["step"] == 3
    exported = load_file(halves / "model.safetensors")
    (halves / "model.safetensors").unlink()
    run("-m", "minimamba_moe.run.distributed", "export", str(halves))
    assert load_model(halves)[1]["step"] == 3
    again = load_file(halves / "model.safetensors")
    assert exported.keys() == again.keys() and all(torch.equal(exported[k], again[k]) for k in exported)
    run(str(ROOT / "train.py"), "--resume", "--batch_size=4", "--max_steps=6", f"--out_dir={halves}",
        f"--data_cache={tmp_path / 'cache'}")
    a, b = ([r["loss"] for r in metrics(d) if "loss" in r] for d in (straight, halves))
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-5, abs=1e-5), f"resumed {b} vs straight {a}"
    assert not (halves / "sharded").exists()  # the one-process run's checkpoint replaced the sharded one
    wa, wb = load_file(straight / "model.safetensors"), load_file(halves / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-5) for k in wa)


def test_a_damaged_sharded_checkpoint_is_one_line(tmp_path):
    config = ModelConfig.from_preset("tiny", d_model=32, n_layer=2, d_expert=32)
    model = build_model(config, SEED, "cpu")
    save_sharded(tmp_path / "sharded", model, adamw(model), {"step": 1, "settings": "{}"})
    (tmp_path / "sharded" / "state.json").write_text("{not json")
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", f"--out_dir={tmp_path}"], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and "state.json is missing or damaged" in p.stderr, p.stderr
    with pytest.raises(CheckpointError, match="does not fit"):
        other = build_model(ModelConfig.from_preset("tiny", d_model=64, n_layer=2, d_expert=32), SEED, "cpu")
        (tmp_path / "sharded" / "state.json").write_text('{"step": 1}')
        load_sharded(tmp_path / "sharded", other, adamw(other))


@pytest.mark.slow
def test_train_py_one_process_checkpoint_resumes_sharded(tmp_path):
    """1 process for 3 steps (a whole-model checkpoint), then 2 FSDP processes to step 6 == 6 steps straight."""
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train = [str(ROOT / "train.py"), *RUN, f"--data_cache={tmp_path / 'cache'}"]
    run(*train, "--batch_size=4", "--max_steps=6", f"--out_dir={straight}")
    run(*train, "--batch_size=4", "--max_steps=3", f"--out_dir={halves}")
    run(str(ROOT / "train.py"), "--resume", "--fsdp", "--batch_size=2", "--max_steps=6", f"--out_dir={halves}",
        f"--data_cache={tmp_path / 'cache'}", nproc=2)
    a, b = ([r["loss"] for r in metrics(d) if "loss" in r] for d in (straight, halves))
    assert b == pytest.approx(a, rel=1e-5, abs=1e-5), f"resumed {b} vs straight {a}"
    assert (halves / "sharded").is_dir() and not (halves / "train_state.pt").exists()
