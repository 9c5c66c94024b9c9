"""benchmarks/gpu_check.py, the parts that run without a GPU: arguments, the summary writer, the skip
without a GPU, the import shim, the pinned minimum versions, the schedule (order, time boxes,
parallel sections, killing a section and what it started, the budget), the summary left by a run
cut off from outside, two GPU-only fixes checked on the CPU, and a dry run of the correctness
sections through Triton's interpreter (the speed, train and sample sections: marked slow)."""

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_check_runs  # noqa: E402


def run(*args, timeout=300, cwd=REPO):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def one_line_error(proc):
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.py: error:"), proc.stderr
    return lines[0]


def test_an_out_folder_that_cannot_be_made_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = one_line_error(run("--out", str(blocker / "sub")))
    assert "--out" in line and str(blocker / "sub") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written


@pytest.mark.parametrize("args,words", [
    ([], "--out"),
    (["--out", "x", "--sections", "scan,speeed"], "speeed"),
    (["--out", "x", "--device", "tpu"], "--device"),
    (["--out", "x", "--budget", "0"], "--budget"),
    (["--out", "x", "--parallel", "-1"], "--parallel"),
    (["--out", "x", "--sections", ","], "--sections"),
    (["--out", "x", "--device", "cuda:x"], "--device"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, args, words):
    line = one_line_error(run(*args, cwd=tmp_path))
    assert words in line
    assert not (tmp_path / "x").exists()


FAKE_ROWS = [
    gpu_check.row("scan", "fwd+bwd float32 small", "pass", 1.5, tol_ratio=0.01, worst="grad A"),
    gpu_check.row("scan", "fwd+bwd bfloat16 paper", "fail", 2.0, tol_ratio=3.5, worst="grad delta"),
    gpu_check.row("moe", "fwd bf16 | pipes", "error", 0.1, error="Traceback (most recent call last):\n  boom\nRuntimeError: CUDA"),
    gpu_check.row("speed", "copy", "pass", 0.5, GBps=2900.0, note=[1, 2.5]),
    gpu_check.row("train", "section", "skip", reason="time box"),
    gpu_check.not_run("speed", "moe fwd", "the section's time box of 120 s ran out before this check"),
    gpu_check.not_run("sample", "decode", "the run's --budget of 450 s was spent before this section started"),
    gpu_check.not_run("model", "big", "the run was interrupted before this section"),
]


def test_summary_writer_writes_json_and_markdown_with_failures(tmp_path):
    counts = gpu_check.write_summary(tmp_path / "new", FAKE_ROWS, dict(device="FakeGPU 80GB", wall_s=12.0))
    assert counts == dict(passed := {"pass": 2, "fail": 1, "error": 1, "skip": 4}) and passed
    data = json.loads((tmp_path / "new" / "summary.json").read_text())
    assert data["counts"] == counts and data["device"] == "FakeGPU 80GB" and data["rows"] == FAKE_ROWS
    assert data["skipped_for_time"] == ["speed: moe fwd", "sample: decode"]  # not the interrupted one
    md = (tmp_path / "new" / "summary.md").read_text()
    assert md.startswith("# gpu_check: FakeGPU 80GB") and "2 passed, 1 failed, 1 errors, 4 skipped" in md
    assert "Not run for lack of time (2): speed: moe fwd; sample: decode." in md.split("## scan")[0]
    for section in ("scan", "moe", "speed", "train"):
        assert f"## {section}\n" in md
    assert "| fwd+bwd bfloat16 paper | fail | 2.0 | tol_ratio 3.5, worst grad delta |" in md
    assert "GBps 2,900" in md and "note [1, 2.5]" in md
    assert "### moe: fwd bf16 | pipes (error)" in md and "RuntimeError: CUDA" in md.split("## failures")[1]
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert all(line.count(" | ") == 3 for line in table_rows), "a | inside a cell broke the table"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["summary.json", "summary.md"]  # no temp files


def test_a_failing_check_is_recorded_and_the_next_one_still_runs(tmp_path):
    results = tmp_path / "rows.jsonl"
    ctx = gpu_check.Ctx("scan", "cpu", True, float("inf"), results)

    def boom():
        raise RuntimeError("kernel exploded")

    ctx.check("first", boom)
    ctx.check("second", lambda: dict(ok=False, tol_ratio=2.0))
    ctx.check("third", lambda: dict(ok=True, tol_ratio=0.5))
    rows = gpu_check.read_rows(results)
    assert [(r["name"], r["status"]) for r in rows] == [("first", "error"), ("second", "fail"), ("third", "pass")]
    assert "RuntimeError: kernel exploded" in rows[0]["error"] and "Traceback" in rows[0]["error"]
    late = gpu_check.Ctx("scan", "cpu", True, 0.0, results)  # past its deadline: skipped, not run
    late.check("fourth", boom)
    assert gpu_check.read_rows(results)[-1]["status"] == "skip"
    assert gpu_check.skipped_for_time(gpu_check.read_rows(results)[-1])


def test_the_scan_tile_sweep_skips_its_tiles_past_its_own_time_box(tmp_path, monkeypatch):
    """Each tile compiles new kernels on the GPU: past SWEEP_S the rest are skipped, for lack of time."""
    monkeypatch.setattr(gpu_check_runs, "SWEEP_S", -1.0)
    results = tmp_path / "rows.jsonl"
    ctx = gpu_check.Ctx("speed", "cpu", True, float("inf"), results)
    tiles = [c for c in gpu_check.section_plan(ctx) if c.name.startswith("scan tile")]
    assert len(tiles) == 3 and tiles[0].name.startswith("scan tile default")
    for c in tiles:
        ctx.check(c.name, c.fn, *c.args, **c.kwargs)
    rows = gpu_check.read_rows(results)
    assert len(rows) == 3 and all(gpu_check.skipped_for_time(r) and "sweep" in r["metrics"]["reason"] for r in rows)


def test_the_swept_scan_tiles_are_in_the_aot_capture():
    """gpu_check times SCAN_TILES at b=4, d_inner=2944, l=2048 in bf16; the AOT check compiles them."""
    pytest.importorskip("triton")
    from minimamba_moe.fast.aot.launch_capture import SCAN_TILES, cases, scan_case

    captured = {args[-1] for _, fn, args in cases() if fn is scan_case and args[:4] == (4, 2944, 2048, torch.bfloat16)}
    assert set(SCAN_TILES) <= captured and len(SCAN_TILES) >= 3


def test_a_section_plan_lists_every_check_before_running_any(tmp_path):
    """Ctx.run writes every check as not run first (what stands if the section is killed), then runs them."""
    results = tmp_path / "rows.jsonl"
    ctx = gpu_check.Ctx("moe", "cpu", True, float("inf"), results)
    seen = []

    def first():
        seen.append(sorted(r["name"] for r in gpu_check.read_rows(results)))
        return {}

    ctx.run([gpu_check.check("a", first), gpu_check.row("moe", "b", "skip", reason="bf16 needs a GPU"),
             gpu_check.check("c", lambda: dict(ok=False))])
    assert seen == [["a", "b", "c"]]  # all three written before the first check ran
    assert [(r["name"], r["status"]) for r in gpu_check.read_rows(results)] == [("a", "pass"), ("b", "skip"),
                                                                                ("c", "fail")]


def test_the_parent_lists_each_sections_checks_without_running_them():
    """Every section's plan builds in the parent without touching a device or running a check (quick, cpu)."""
    for section in gpu_check.SECTIONS:
        rows = gpu_check.planned_rows(section, "cpu", True)
        assert rows and all(r["section"] == section and r["status"] == "skip" for r in rows), rows
        assert not any(r["name"] == "section" for r in rows), rows  # the plan was built, not replaced by one row
    names = [r["name"] for r in gpu_check.planned_rows("speed", "cuda", False)]
    assert "moe fwd+bwd blackmamba-1.5b T=16384 d=1152 f=3072 E=8" in names and len(names) == 21
    assert "scan tile block_l=32 block_d=8 fwd+bwd b=4 d_inner=2944 l=2048" in names
    assert len(gpu_check.planned_rows("scan", "cuda", False)) == 10 and not any(
        "need a GPU" in str(r["metrics"]) for r in gpu_check.planned_rows("scan", "cuda", False))


def test_sections_run_in_a_fixed_order_with_speed_last():
    args = gpu_check.parse_args(["--out", "x", "--sections", "speed,sample,scan,train,env"])
    assert args.sections == ["env", "scan", "train", "sample", "speed"]
    assert gpu_check.SECTIONS[-1] == "speed" and gpu_check.SECTIONS.index("train") < gpu_check.SECTIONS.index("sample")
    assert args.parallel == len(gpu_check.KERNEL_SECTIONS)
    assert gpu_check.parse_args(["--out", "x", "--device", "cpu"]).parallel == 2


def test_time_boxes_hold_back_time_for_train_and_sample():
    plan, caps, hold = list(gpu_check.SECTIONS), gpu_check.CAPS, gpu_check.RESERVE
    assert gpu_check.time_box("scan", plan, 0, 450) == caps["scan"]  # the default budget fits every cap
    assert gpu_check.time_box("scan", plan, 0, 200) == 200 - hold["train"] - hold["sample"]
    assert gpu_check.time_box("train", plan, 100, 200) == 100 - hold["sample"]
    assert gpu_check.time_box("speed", plan, 400, 450) == 50  # speed, last, gets what is left
    assert gpu_check.time_box("scan", ["scan", "speed"], 0, 200) == caps["scan"]  # nothing to hold back
    worst = max(caps[s] for s in gpu_check.KERNEL_SECTIONS) + caps["train"] + caps["sample"]
    assert worst <= 450 - 60, "with the default budget, speed keeps at least a minute"


def fake_launcher(tmp_path, behaviour):
    """A launcher for run_plan whose sections are tiny Python processes: behaviour[section] is the code
    each runs (it may use RESULTS, the rows file, and ROW(name, status))."""
    starts = {}

    def launch(section, args, tmp, timeout):
        results, log = tmp_path / f"{section}.jsonl", tmp_path / f"{section}.log"
        code = ("import json, subprocess, sys, time\n"
                f"RESULTS = {str(results)!r}\n"
                f"def ROW(name, status):\n"
                f"    open(RESULTS, 'a').write(json.dumps(dict(section={section!r}, name=name, status=status, "
                "seconds=0.0, metrics={}, error=None)) + '\\n')\n" + behaviour[section])
        starts[section] = time.monotonic()
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return gpu_check.Running(proc, results, log, time.monotonic(), timeout)

    return launch, starts


def test_run_plan_runs_checks_side_by_side_kills_a_hung_section_and_its_children_and_keeps_to_the_budget(
        tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "CAPS", dict(gpu_check.CAPS, moe=1.5, scan=10, train=10, speed=10))
    monkeypatch.setattr(gpu_check, "RESERVE", dict(train=0, sample=0))
    monkeypatch.setattr(gpu_check, "MIN_BOX", 0.5)
    grandchild = tmp_path / "grandchild.pid"
    launch, starts = fake_launcher(tmp_path, dict(
        scan="time.sleep(0.5); ROW('a', 'pass'); ROW('b', 'fail')",
        moe=f"p = subprocess.Popen(['sleep', '60']); open({str(grandchild)!r}, 'w').write(str(p.pid)); time.sleep(60)",
        train="ROW('t', 'pass')", speed="ROW('s', 'pass')"))
    planned = {s: [gpu_check.not_run(s, n, "the run ended before this check") for n in names]
               for s, names in dict(scan=["a", "b"], moe=["c"], train=["t"], speed=["s"]).items()}
    writes = []
    args = types.SimpleNamespace(t0=time.monotonic(), budget=1.7, parallel=6, tmp=str(tmp_path))
    rows = gpu_check.run_plan(args, planned, lambda by, note: writes.append((by, note)), launcher=launch,
                              poll_s=0.05, write_every_s=0.2)
    assert abs(starts["scan"] - starts["moe"]) < 0.5  # the correctness sections ran side by side
    assert [(r["name"], r["status"]) for r in rows["scan"]] == [("a", "pass"), ("b", "fail")]
    c, process = rows["moe"]
    assert c["status"] == "skip" and "time box of 2 s ran out" in c["metrics"]["reason"]
    assert process["name"] == "section process" and "killed at its time box" in process["error"]
    pid = int(grandchild.read_text())
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously
    while status.exists() and "zombie" not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = status.exists() and "zombie" not in status.read_text()
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the hung section's subprocess survived"
    for s in ("train", "speed"):  # the budget was spent by then: not started, and the summary says why
        assert [r["status"] for r in rows[s]] == ["skip"] and "--budget of 2 s" in rows[s][0]["metrics"]["reason"]
        assert gpu_check.skipped_for_time(rows[s][0]) and s not in starts
    assert len(writes) >= 2 and "partial" in writes[0][1]  # rewritten while running


def test_a_run_cut_off_from_outside_leaves_a_summary_listing_every_planned_check(tmp_path):
    """The summary is written before any section starts (what a SIGKILL leaves) and again on SIGTERM."""
    out = tmp_path / "gc"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu", "--quick",
                             "--sections", "env,step,model"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        first = json.loads((out / "summary.json").read_text())  # "starting", or already a "partial" rewrite
        assert "cut off" in first["note"] or "starting" in first["note"]
        assert {r["section"] for r in first["rows"]} == {"env", "step", "model"} and len(first["rows"]) == 1 + 2 + 8
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "interrupted" in stdout, (stdout, stderr)
    last = json.loads((out / "summary.json").read_text())
    assert "interrupted" in last["note"] and len(last["rows"]) >= len(first["rows"])
    assert {r["name"] for r in first["rows"]} <= {r["name"] for r in last["rows"]}
    unrun = [r["metrics"]["reason"] for r in last["rows"] if gpu_check.is_placeholder(r)]
    assert unrun and all("interrupted" in reason for reason in unrun), unrun  # not blamed on a time box
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_bench_times_a_slow_plain_pytorch_call_once_and_a_kernel_after_a_warm_up():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)

    t, runs = gpu_check_runs.bench(slow, cuda=False, budget_s=0.01, cold_ok=True)
    assert runs == 1 and len(calls) == 1 and t >= 0.05
    calls.clear()
    t, runs = gpu_check_runs.bench(slow, cuda=False, budget_s=0.01)  # a kernel: warm-up, then at least 3
    assert runs == 3 and len(calls) == 4


def test_ieee_fp32_turns_tf32_off_for_matmuls_and_cudnn_convolutions():
    import gpu_check_kernels

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        gpu_check_kernels.ieee_fp32()
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32  # readable
        if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9: the per-op setting follows
            assert torch.backends.cudnn.conv.fp32_precision != "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_fast_moe_on_the_gpu_runs_its_kernels_in_the_autocast_dtype(monkeypatch):
    """Under train.py's bf16 autocast the MoE input and weights are fp32; the Triton call must get them in
    bf16 (as autocast gives the reference's matmuls), and the fp32 weights fp32 gradients. Shown on the
    CPU with the kernel replaced by the reference (the dispatch is the same for any device type)."""
    gpu_check.use_checkout()
    fast_moe = importlib.import_module("minimamba_moe.fast.moe")
    from minimamba_moe import reference

    seen = []

    def kernel(x, idx, gates, w1, w2, activation):
        seen.append((x.dtype, w1.dtype, w2.dtype))
        return reference.moe_experts(x, idx, gates.to(x.dtype), w1, w2, activation)

    monkeypatch.setattr(fast_moe, "moe_experts_triton", kernel)
    g = torch.Generator().manual_seed(0)
    x, gates = torch.randn(6, 8, generator=g), torch.rand(6, 1, generator=g)
    w1 = torch.randn(3, 10, 8, generator=g, requires_grad=True)
    w2 = torch.randn(3, 8, 5, generator=g, requires_grad=True)
    idx = torch.tensor([[0], [1], [2], [0], [1], [-1]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast_moe._triton_under_autocast(x, idx, gates, w1, w2, "swiglu")
    out.sum().backward()
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.bfloat16)] and out.dtype == torch.float32
    assert w1.grad.dtype == torch.float32 and w1.grad.abs().sum() > 0
    out = fast_moe._triton_under_autocast(x, idx, gates, w1, w2, "swiglu")  # no autocast: as given
    assert seen[-1] == (torch.float32,) * 3 and out.dtype == torch.float32


def test_a_check_killed_midway_is_reported_as_not_finished(tmp_path):
    """The row written before a check starts stands when the section's process is killed during it."""
    results = tmp_path / "rows.jsonl"
    ctx = gpu_check.Ctx("moe", "cpu", True, float("inf"), results)
    ctx.check("done", lambda: {})
    ctx.emit(gpu_check.row("moe", "hung", "error", error="did not finish: the section was killed at its time box"))
    rows = gpu_check.read_rows(results)
    assert [(r["name"], r["status"]) for r in rows] == [("done", "pass"), ("hung", "error")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line_exits_0_and_writes_the_reason(tmp_path):
    proc = run("--out", str(tmp_path / "gc"))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and "no CUDA GPU" in proc.stdout
    data = json.loads((tmp_path / "gc" / "summary.json").read_text())
    assert data["counts"]["skip"] == len(gpu_check.SECTIONS) and not data["counts"]["pass"]
    assert all("no CUDA GPU" in r["metrics"]["reason"] for r in data["rows"])
    assert "Nothing checked" in (tmp_path / "gc" / "summary.md").read_text()


def test_the_shim_imports_the_checkout_it_sits_in_even_when_another_copy_is_installed(tmp_path):
    """A copy of the checkout imports its own package, not the (editable) install of this worktree."""
    for folder in ("minimamba_moe", "reference", "fast", "benchmarks"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_check; gpu_check.use_checkout(); "
            "import minimamba_moe.fast, minimamba_moe.reference; from minimamba_moe import Model; "
            "print(minimamba_moe.__file__, minimamba_moe.fast.__file__, minimamba_moe.reference.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = proc.stdout.split()
    assert [Path(f).relative_to(tmp_path).parts[0] for f in files] == ["minimamba_moe", "fast", "reference"], files


def test_train_metrics_read_defensively():
    """tokens/s from the field of that name (or tok_s, tokens_per_sec), never from tokens_per_expert."""
    warmup = [dict(step=i, loss=5.0, tokens_per_expert=[[9, 9]], tokens_per_s=1.0) for i in range(1, 6)]
    later = [dict(step=i, tokens_per_expert=[[1, 2]], loss=4.0, tokens_per_s=100.0 + i) for i in range(6, 9)]
    records = [dict(step=0, val_loss=5.5)] + warmup + later + [dict(step=8, val_loss=4.1)]
    assert gpu_check_runs.train_metrics(records) == dict(steps=8, first_loss=5.0, last_loss=4.0, tokens_per_s=107.0)
    renamed = [{k.replace("tokens_per_s", "tok_s"): v for k, v in r.items()} for r in records]
    assert gpu_check_runs.train_metrics(renamed)["tokens_per_s"] == 107.0
    assert "n/a" in gpu_check_runs.train_metrics([dict(step=1, loss=3.0)])["tokens_per_s"]
    with pytest.raises(RuntimeError, match="no training records"):
        gpu_check_runs.train_metrics([dict(step=0, val_loss=5.5)])


def test_the_shim_runs_the_scripts_at_the_root():
    proc = gpu_check_runs.run_script("sample.py", ["--help"], 120)
    assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr


def test_pyproject_states_the_minimum_versions_the_check_enforces():
    text = (REPO / "pyproject.toml").read_text()
    for package, version in gpu_check.MIN_VERSIONS.items():
        found = re.findall(rf'"{package}>=([\d.]+)', text)
        assert found == [version], f"pyproject.toml has {package}>={found}, gpu_check.MIN_VERSIONS {version}"
    assert not gpu_check.below_minimum("torch", torch.__version__)


@pytest.mark.parametrize("package,version,below", [
    ("torch", "2.11.0+cu130", False), ("torch", "2.6.0", False), ("torch", "2.5.1", True), ("torch", "2.10", False),
    ("triton", "3.6.0", False), ("triton", "3.2.0", False), ("triton", "3.1.0", True), ("triton", "3.10.0rc1", False),
])
def test_version_comparison(package, version, below):
    assert gpu_check.below_minimum(package, version) == below


def dry_run(tmp_path, sections):
    proc = run("--out", str(tmp_path), "--device", "cpu", "--quick", "--sections", sections, timeout=600)
    data = json.loads((tmp_path / "summary.json").read_text())
    bad = [r for r in data["rows"] if r["status"] in ("fail", "error")]
    assert proc.returncode == 0 and not bad, (proc.stdout, proc.stderr, bad)
    assert proc.stdout.count("\n") == 1 and "passed" in proc.stdout
    return data


def test_cpu_dry_run_end_to_end(tmp_path):
    """The driver, section subprocesses and two kernels' checks through the interpreter (bf16: skipped)."""
    data = dry_run(tmp_path, "env,step,sinkhorn")
    assert {r["section"] for r in data["rows"] if r["status"] == "pass"} == {"env", "step", "sinkhorn"}
    assert all("bfloat16" in r["name"] for r in data["rows"] if r["status"] == "skip")
    assert (tmp_path / "summary.md").read_text().count("| pass |") == data["counts"]["pass"]


@pytest.mark.slow
def test_cpu_dry_run_of_every_correctness_section(tmp_path):
    """Every kernel and model check's code path on small shapes (~1 minute on 2 cores)."""
    data = dry_run(tmp_path, "scan,moe,model")
    assert {r["section"] for r in data["rows"] if r["status"] == "pass"} == {"scan", "moe", "model"}
    assert all("bfloat16" in r["name"] for r in data["rows"] if r["status"] == "skip")


@pytest.mark.slow
def test_cpu_dry_run_of_speed_train_and_sample(tmp_path):
    data = dry_run(tmp_path, "speed,train,sample")
    names = {r["name"]: r["metrics"] for r in data["rows"]}
    assert names["device-to-device copy"]["GBps"] > 0
    tiles = [m for name, m in names.items() if name.startswith("scan tile")]
    assert len(tiles) == 3 and tiles[0]["x_vs_default"] == 1.0 and all(m["ms"] > 0 for m in tiles)
    assert names["tiny preset"]["tokens_per_s"] > 0
    assert names["tiny preset"]["data_MB"] > 0.5  # trained on the checkout's own sources, present on any machine
    assert names["decode after 256 prompt tokens"]["decode_ms_per_token"] > 0
