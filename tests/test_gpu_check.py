"""benchmarks/gpu_check.py, the parts that run without a GPU: arguments, the summary writer, the skip
without a GPU, the import shim, the pinned minimum versions, and a dry run of the correctness
sections through Triton's interpreter (the speed, train and sample sections: marked slow)."""

import json
import re
import shutil
import subprocess
import sys
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
]


def test_summary_writer_writes_json_and_markdown_with_failures(tmp_path):
    counts = gpu_check.write_summary(tmp_path / "new", FAKE_ROWS, dict(device="FakeGPU 80GB", wall_s=12.0))
    assert counts == dict(passed := {"pass": 2, "fail": 1, "error": 1, "skip": 1}) and passed
    data = json.loads((tmp_path / "new" / "summary.json").read_text())
    assert data["counts"] == counts and data["device"] == "FakeGPU 80GB" and data["rows"] == FAKE_ROWS
    md = (tmp_path / "new" / "summary.md").read_text()
    assert md.startswith("# gpu_check: FakeGPU 80GB") and "2 passed, 1 failed, 1 errors, 1 skipped" in md
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
    assert names["tiny preset"]["tokens_per_s"] > 0
    assert names["decode after 256 prompt tokens"]["decode_ms_per_token"] > 0
