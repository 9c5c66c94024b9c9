"""Each benchmarks/ script runs with --quick, and its JSON holds the fields and laws the docs rely on.

The scripts run as subprocesses (as a reader runs them), once per module, on a small local text
(this repository's own sources) so that no test tokenizes the whole standard library. Timings
are never asserted, only their consistency: a speed-up field equals the ratio of the curve points
it is computed from, Mamba states do not grow with the context, the FLOP budget is shared.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
pytestmark = pytest.mark.with_extra("plots")  # the PNG is drawn and checked only with matplotlib


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    text = "\n".join(p.read_text() for p in sorted((ROOT / "minimamba_moe").glob("*.py")))
    (folder / "corpus.txt").write_text(text)
    return folder


def run(script: str, tmp: Path, corpus: Path | None, *extra: str, env=None) -> dict:
    out = tmp / f"{script}.json"
    cmd = [sys.executable, str(BENCH / f"{script}.py"), "--quick", "--out", str(out), "--png", str(tmp / f"{script}.png"),
           "--threads", "1", "--device", "cpu", *extra]
    if corpus is not None:
        cmd += ["--data", str(corpus / "corpus.txt"), "--data_cache", str(corpus / "cache")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "| model" in res.stdout or "| router" in res.stdout or "| seed" in res.stdout  # a table was printed
    png = tmp / f"{script}.png"
    if HAVE_MPL:  # the `plots` extra: the figure is drawn; without it, one line says so and nothing is written
        assert png.stat().st_size > 1000
    else:
        assert "matplotlib is not installed: no PNG" in res.stdout and not png.exists(), res.stdout[-2000:]
    return json.loads(out.read_text())


def close(a, b, rel=1e-9):
    return math.isclose(a, b, rel_tol=rel)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def test_bench_generate(tmp):
    r = run("bench_generate", tmp, None)
    models = r["models"]
    assert set(models) == {"mamba_moe", "mamba", "transformer", "transformer_moe"}
    actives = [m["params_active"] for m in models.values()]
    assert max(actives) / min(actives) < 1.01, actives  # equal active parameters
    new = r["args"]["new"]
    for fam, m in models.items():
        curve = m["curve"]
        assert [p["context"] for p in curve] == [16, 64, 256]
        assert all(p["step_s"] > 0 and p["prefill_s"] > 0 for p in curve)
        sizes = [p["state_bytes"] for p in curve]
        if fam.startswith("mamba"):
            assert len(set(sizes)) == 1, f"{fam}: the recurrent state grew with the context: {sizes}"
        else:  # a KV cache: 2 tensors x layers x (context + new + 1) positions x d_model x 4 bytes
            n_attn = m["layer_pattern"].count("attention") * m["n_layer"] // len(m["layer_pattern"])
            assert sizes == [2 * n_attn * (p["context"] + new + 1) * m["d_model"] * 4 for p in curve]
        assert close(m["step_growth"], curve[-1]["step_s"] / curve[0]["step_s"])
        assert close(m["state_growth"], sizes[-1] / sizes[0])
        assert close(m["mamba_moe_speedup_at_max_context"], curve[-1]["step_s"] / models["mamba_moe"]["curve"][-1]["step_s"])


def test_bench_generate_without_matplotlib(tmp):
    fake = tmp / "no_mpl"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp / "nompl"
    out.mkdir()
    res = subprocess.run([sys.executable, str(BENCH / "bench_generate.py"), "--quick", "--contexts", "8,16",
                          "--out", str(out / "r.json"), "--png", str(out / "r.png")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "matplotlib is not installed" in res.stdout
    assert (out / "r.json").exists() and not (out / "r.png").exists()


def test_bench_train(tmp, corpus):
    r = run("bench_train", tmp, corpus)
    tokens = r["tokens_per_step"]
    for fam, m in r["models"].items():
        for b in ("fast", "reference"):
            x = m["backends"][b]
            assert close(x["tokens_per_s"] * x["step_s"], tokens)
            assert close(x["model_flops_per_s"] / x["tokens_per_s"], 3 * m["flops_per_token_fwd"], rel=1e-6)
        assert close(m["fast_speedup"], m["backends"]["reference"]["step_s"] / m["backends"]["fast"]["step_s"])


def test_reproduce_moe_mamba(tmp, corpus):
    from common import ema
    from reproduce_moe_mamba import speedup

    r = run("reproduce_moe_mamba", tmp, corpus)
    a, b = r["models"]["mamba"]["params_active"], r["models"]["mamba_moe"]["params_active"]
    assert abs(a - b) / a < 0.02, (a, b)
    assert r["models"]["mamba_moe"]["params_total"] > b  # the inactive experts
    alpha = r["args"]["ema_alpha"]
    for run_ in r["runs"]:
        for fam in ("mamba", "mamba_moe"):
            assert len(run_[fam]["train_loss"]) == r["args"]["steps"]
            assert run_[fam]["smoothed"] == pytest.approx(ema(run_[fam]["train_loss"], alpha))
            assert math.isfinite(run_[fam]["final_val_loss"])
        s, step = speedup(run_["mamba"]["smoothed"], run_["mamba_moe"]["smoothed"])
        assert run_["speedup"] == s and run_["moe_steps_to_mamba_final"] == step
        if step is not None:  # the step really is the first to reach Mamba's final smoothed loss
            assert run_["mamba_moe"]["smoothed"][step - 1] <= run_["mamba"]["smoothed"][-1]
            assert all(v > run_["mamba"]["smoothed"][-1] for v in run_["mamba_moe"]["smoothed"][: step - 1])
    speedups = [x["speedup"] for x in r["runs"] if x["speedup"] is not None]
    assert r["summary"]["speedup"]["n"] == len(speedups)
    if speedups:
        assert r["summary"]["speedup"]["mean"] == pytest.approx(sum(speedups) / len(speedups))


def test_speedup_rule():
    from reproduce_moe_mamba import speedup

    mamba = [5, 4, 3, 2]
    assert speedup(mamba, [4, 2, 1, 1]) == (2.0, 2)  # MoE reaches 2 at step 2 of 4
    assert speedup(mamba, [5, 5, 4, 3]) == (0.75, None)  # MoE ends at 3, which Mamba reached at step 3


def test_reproduce_blackmamba(tmp, corpus):
    r = run("reproduce_blackmamba", tmp, corpus)
    budget, models = r["flop_budget"], r["models"]
    tokens = r["args"]["batch_size"] * r["args"]["seq_len"]
    actives = [m["params_active"] for m in models.values()]
    assert max(actives) / min(actives) < 1.01
    for fam, m in models.items():  # each model spends the budget, to within one step
        assert m["train_flops"] <= budget * (1 + 1e-9)
        assert budget - m["train_flops"] < m["flops_per_token_train"] * tokens or m["steps"] == 1
        for run_ in r["runs"]:
            assert run_[fam]["steps"] == m["steps"] and math.isfinite(run_[fam]["final_val_loss"])
    assert models["mamba_moe"]["steps"] == r["args"]["steps"]
    inf = r["expert_load"]["inference"]
    n_moe = models["mamba_moe"]["layer_pattern"].count("moe") * models["mamba_moe"]["n_layer"] // 2
    assert len(inf) == n_moe and all(len(l) == r["args"]["n_experts"] for l in inf)
    assert all(sum(l) == r["args"]["eval_batches"] * tokens for l in inf)  # top-1: every token once
    assert all(1 <= x <= r["args"]["n_experts"] for x in r["expert_imbalance"]["inference"])
    s = r["summary"]
    assert s["mamba_moe_lowest"] == all(s["final_val_loss"]["mamba_moe"]["mean"] < s["final_val_loss"][f]["mean"]
                                        for f in models if f != "mamba_moe")


def test_ablate_routers(tmp, corpus):
    r = run("ablate_routers", tmp, corpus)
    routers = r["routers"]
    assert set(routers) == {"sinkhorn-released", "sinkhorn-converged", "sigmoid", "switch"}
    # The released rule stops after one pass once the batch is large (its absolute tolerance is
    # compared with d1 ~ 1/(E T)); with --quick's 128 tokens it sometimes needs a second one.
    released = routers["sinkhorn-released"]["summary"]["sinkhorn_iters_mean"]["mean"]
    converged = routers["sinkhorn-converged"]["summary"]["sinkhorn_iters_mean"]["mean"]
    assert 1 <= released < converged, (released, converged)
    for name in ("sinkhorn-released", "sinkhorn-converged", "sigmoid"):
        assert routers[name]["summary"]["dropped_frac"]["mean"] == 0.0  # no capacity limit
    assert routers["sigmoid"]["summary"]["sinkhorn_iters_mean"]["mean"] == 0.0
    assert 0 <= routers["switch"]["summary"]["dropped_frac"]["mean"] < 1
    for info in routers.values():
        for run_ in info["runs"]:
            assert all(1 <= x <= r["args"]["n_experts"] + 1e-9 for x in run_["imbalance_inference"])
            assert math.isfinite(run_["final_val_loss"])
