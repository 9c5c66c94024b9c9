"""One prepared check of the kernels, train.py and sample.py on a CUDA GPU, with timings.

    python benchmarks/gpu_check.py --out $OUT/gpu_check                  # on a GPU: about 4-7 minutes
    python benchmarks/gpu_check.py --out /tmp/gc --device cpu --quick    # dry run without a GPU

On the device tool, in one call: ``run(command="python benchmarks/gpu_check.py --out $OUT/gpu_check",
timeout_s=600)``. Expected wall time on one H100: 4-7 minutes; the whole run stops at --budget
(default 450 s) and each section at its own cap, so it ends inside the 10-minute call either way.
It writes DIR/summary.json and DIR/summary.md and prints one line; exit status 0 when every check
passed (or when there is no GPU: it says so and writes a summary stating the skip), 1 when one failed,
2 on bad arguments. It needs nothing but this checkout and torch + triton: no network, no pip
install (the checkout's own package is imported, mapped the way pyproject.toml's package-dir maps
it), no `datasets`, no hypothesis.

Sections (each in its own subprocess, so a crash, a hang or a poisoned CUDA context costs one
section, never the run; every failure is caught with its traceback into the summary). This file is
the driver; the first six live in gpu_check_kernels.py, the last three in gpu_check_runs.py:

    env        torch / triton / CUDA versions, the device, where the package was imported from
    scan       Triton selective scan forward + backward vs reference/ (run in float64 on the same
               values), fp32 and bf16, small shapes and the papers' d_inner 2304 / 2944 at l = 2048
    step       Triton decode step vs reference, fp32 and bf16 inputs
    moe        Triton MoE forward + backward vs reference, fp32 and bf16: small shapes, BlackMamba's
               8 experts of 3072 / 3872 (top-1), MoE-Mamba's 42 experts (ReLU, capacity drops)
    sinkhorn   the fused Triton Sinkhorn vs reference: P, routes, iteration counts
    model      whole model, fast vs reference backend: logits, every parameter's gradient, bf16
               autocast, and step decoding == forward
    speed      medians of CUDA-event timings: copy GB/s and dense bf16 matmul TFLOP/s measured here,
               then each kernel's time, GB/s (scan, step, Sinkhorn) or TFLOP/s (MoE) against them,
               and plain PyTorch doing the same work (reference/, torch grouped_mm via fast/moe_cpu.py)
    train      train.py in bf16 for a few dozen steps (tiny; blackmamba-1.5b with 4 layers):
               tokens/s, MFU (minimamba_moe/flops.py), peak memory
    sample     sample.py decode ms/token after a 1k and an 8k-token prompt (random weights)

Tolerances are the test suite's (tests/test_fast_scan.py, test_triton_moe.py, test_fast_moe.py,
test_fast_sinkhorn.py, test_model.py); each check reports the worst ratio of error to allowed error
(<= 1 passes). ``--device cpu --quick`` runs the same code on small shapes with Triton's
interpreter (fp32 only: the bf16 kernel checks are skipped), so every code path runs before the
one GPU run. ``--sections scan,moe`` runs a subset.

Supported versions (pyproject.toml: torch >= 2.6, triton >= 3.2; MIN_VERSIONS below says why; the env
section fails below them). The interpreter tests of the Triton kernels under the oldest claimed Triton:
    python3 -m venv .venv-old && . .venv-old/bin/activate && pip install torch "triton==3.2.0" "numpy<2.4" \
      pytest hypothesis tqdm tiktoken safetensors && pip install --no-deps -e . \
      && python -m pytest -q tests/test_triton_scan.py tests/test_triton_moe.py tests/test_fast_sinkhorn.py
(20 passed with Triton 3.2.0, 3.3.1 and 3.6.0; 3.0.0 fails. Triton 3.6's interpreter needs numpy < 2.4.)
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"minimamba_moe": "minimamba_moe", "minimamba_moe.reference": "reference",
                "minimamba_moe.fast": "fast"}  # pyproject.toml [tool.setuptools.package-dir]
KERNEL_SECTIONS = ("env", "scan", "step", "moe", "sinkhorn", "model")  # in gpu_check_kernels.py
SECTIONS = KERNEL_SECTIONS + ("speed", "train", "sample")  # the last three in gpu_check_runs.py
CAPS = dict(env=60, scan=100, step=40, moe=100, sinkhorn=40, model=80, speed=100, train=170, sample=90)  # s
STATUSES = ("pass", "fail", "error", "skip")
# The oldest versions supported: pyproject.toml states the same (tests/test_gpu_check.py holds them equal).
# torch 2.6: torch.distributed.fsdp.fully_shard (train.py --fsdp), nn.RMSNorm. triton 3.2: the oldest whose
# interpreter passes the kernel tests (3.0 fails them). Checked on CPU: torch 2.6.0 + triton 3.2.0 pass the
# kernel, model, train, sample and checkpoint tests, and train.py's DDP under torchrun with gloo (it averages
# with SUM and a division: gloo in 2.6.0 and 2.7.1 raises "Cannot use ReduceOp.AVG with Gloo"). torch 2.6's
# FSDP2 does not run on CPU ("'Stream' object has no attribute 'record_event'"), so the gloo FSDP tests need
# a newer torch; FSDP2 on GPUs under 2.6 is untested.
MIN_VERSIONS = {"torch": "2.6", "triton": "3.2"}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Import minimamba_moe, .reference and .fast from this checkout, mapped as pyproject.toml maps them."""

    def find_spec(self, name, path=None, target=None):
        if name not in PACKAGE_DIRS:
            return None  # submodules are found through the package's __path__
        folder = REPO / PACKAGE_DIRS[name]
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0); '3.6.0rc1' -> (3, 6, 0)."""
    return tuple(int(re.match(r"\d*", part).group() or 0) for part in version.split("+")[0].split(".")[:3])


def below_minimum(package: str, version: str) -> bool:
    return version_tuple(version) < version_tuple(MIN_VERSIONS[package])


def use_checkout() -> None:
    """Make `import minimamba_moe` (and .reference, .fast) load this checkout, installed or not."""
    if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFinder())
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------------
# results: one row per check or measurement


def row(section, name, status, seconds=0.0, error=None, **metrics) -> dict:
    assert status in STATUSES, status
    return dict(section=section, name=name, status=status, seconds=round(seconds, 3), metrics=metrics, error=error)


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e3 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def write_summary(out_dir: Path, rows: list[dict], info: dict) -> dict:
    """summary.json and summary.md in out_dir, each written to a temporary file then renamed; returns counts."""
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    data = dict(info, counts=counts, rows=rows)
    lines = [f"# gpu_check: {info.get('device', '?')}", "",
             f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, {counts['skip']} skipped "
             f"in {info.get('wall_s', 0):.0f} s" + (f". {info['note']}" if info.get("note") else "."), ""]
    for section in dict.fromkeys(r["section"] for r in rows):
        lines += [f"## {section}", "", "| check | status | s | measured |", "|---|---|---|---|"]
        for r in (r for r in rows if r["section"] == section):
            measured = ", ".join(f"{k} {fmt(v)}" for k, v in r["metrics"].items())
            cells = [c.replace("|", "\\|").replace("\n", " ") for c in (r["name"], r["status"], measured)]
            lines.append(f"| {cells[0]} | {cells[1]} | {r['seconds']:.1f} | {cells[2]} |")
        lines.append("")
    failures = [r for r in rows if r["status"] in ("fail", "error") and r["error"]]
    if failures:
        lines += ["## failures", ""]
        for r in failures:
            lines += [f"### {r['section']}: {r['name']} ({r['status']})", "", "```", r["error"].rstrip(), "```", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("summary.json", json.dumps(data, indent=1) + "\n"), ("summary.md", "\n".join(lines))):
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out_dir / name)
    return counts


# ---------------------------------------------------------------------------------------------------
# helpers used inside the section subprocesses


class Ctx:
    """What a section needs: the device, quick mode, its deadline, and where its rows go (one JSON line each)."""

    def __init__(self, section, device, quick, deadline, results_path):
        self.section, self.device, self.quick, self.deadline = section, device, quick, deadline
        self.results_path = results_path
        self.cuda = device.startswith("cuda")

    def emit(self, r):
        with open(self.results_path, "a") as f:
            f.write(json.dumps(r) + "\n")

    def check(self, name, fn, *args, **kwargs):
        """Run fn -> dict of metrics (with 'ok' for checks); one row, whatever happens."""
        import torch

        if time.monotonic() > self.deadline:
            return self.emit(row(self.section, name, "skip", error=None, reason="section time box reached"))
        t0 = time.monotonic()
        # If the section is killed during this check, this row stands (the parent keeps a name's last row).
        self.emit(row(self.section, name, "error", error="did not finish: the section was killed at its time box"))
        try:
            metrics = fn(*args, **kwargs)
            if self.cuda:
                torch.cuda.synchronize()
            status = "pass" if metrics.pop("ok", True) else "fail"
            self.emit(row(self.section, name, status, time.monotonic() - t0, **metrics))
        except Exception:  # noqa: BLE001 - every failure goes into the summary, the run goes on
            self.emit(row(self.section, name, "error", time.monotonic() - t0, error=traceback.format_exc()))
        finally:
            if self.cuda:
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# the driver


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"gpu_check.py: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for summary.json and summary.md (created)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu: a dry run through Triton's interpreter")
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    ap.add_argument("--section-child", help=argparse.SUPPRESS)  # internal: run one section in this process
    ap.add_argument("--results", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-s", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section {bad[0]!r}: choose from {', '.join(SECTIONS)}")
    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        ap.error(f"--device {args.device}: use cuda, cuda:N or cpu")
    if not args.budget > 0:
        ap.error("--budget must be a positive number of seconds")
    args.sections = sections
    return args


def check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".gpu_check_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        print(f"gpu_check.py: error: cannot write to --out {out} ({e.strerror or e}): give a folder you can write to",
              file=sys.stderr)
        sys.exit(2)


def child_env(device):
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # the kernels on CPU tensors; must be set before triton is imported
    return env


def read_rows(path: Path) -> list[dict]:
    """A section's rows (JSON lines), keeping each check's last row: its result, or "did not finish"."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return list({r["name"]: r for r in rows}.values())


def run_section(section, args, deadline, tmp) -> list[dict]:
    results = Path(tmp) / f"{section}.jsonl"
    timeout = min(CAPS[section], deadline - time.monotonic())
    if timeout < 5:
        return [row(section, "section", "skip", reason=f"the run's --budget of {args.budget:.0f} s is spent")]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", args.out, "--device", args.device,
           "--section-child", section, "--results", str(results), "--deadline-s", str(timeout - 3)]
    cmd += ["--quick"] if args.quick else []
    t0 = time.monotonic()
    try:
        scratch = Path(tmp) / f"{section}_tmp"  # the section's checkpoints and data: removed with tmp at the end
        scratch.mkdir()
        env = dict(child_env(args.device), TMPDIR=str(scratch))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        problem = None if proc.returncode == 0 else f"section process exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    except subprocess.TimeoutExpired as e:
        problem = f"section killed after its time box of {timeout:.0f} s:\n{(e.stderr or b'')[-4000:]!s}"
    rows = read_rows(results)
    if problem:
        rows.append(row(section, "section process", "error", time.monotonic() - t0, error=problem))
    return rows


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.section_child:  # inside a section's subprocess
        use_checkout()
        import torch

        torch.manual_seed(0)
        ctx = Ctx(args.section_child, args.device, args.quick, time.monotonic() + args.deadline_s, args.results)
        if args.device == "cpu":
            torch.set_num_threads(min(2, torch.get_num_threads()))
        module = "gpu_check_kernels" if args.section_child in KERNEL_SECTIONS else "gpu_check_runs"
        getattr(importlib.import_module(module), f"section_{args.section_child}")(ctx)
        return 0

    out = Path(args.out)
    check_out(out)
    t0 = time.monotonic()
    import torch

    info = dict(command=" ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
                started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), torch=torch.__version__,
                python=sys.version.split()[0], quick=args.quick)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        reason = "no CUDA GPU here (torch.cuda.is_available() is False)"
        rows = [row(s, "section", "skip", reason=reason) for s in args.sections]
        write_summary(out, rows, dict(info, device="none", wall_s=time.monotonic() - t0,
                                      note=f"Nothing checked: {reason}. Run it on a GPU, or --device cpu --quick"))
        print(f"gpu_check: skipped, {reason}; summary in {out}/summary.md (a dry run: --device cpu --quick)")
        return 0
    info["device"] = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu (Triton interpreter)"

    rows = []
    deadline = t0 + args.budget
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for section in args.sections:
            rows += run_section(section, args, deadline, tmp)
            write_summary(out, rows, dict(info, wall_s=time.monotonic() - t0, note="running"))  # partial results survive
    # MFU against the matmul measured in this run, beside the nominal peak
    matmul = next((r["metrics"].get("TFLOPs") for r in rows if r["name"].startswith("dense matmul")), None)
    for r in rows:
        if r["section"] == "train" and matmul and isinstance(r["metrics"].get("model_TFLOPs"), float):
            r["metrics"]["of_measured_matmul"] = r["metrics"]["model_TFLOPs"] / matmul
    counts = write_summary(out, rows, dict(info, wall_s=time.monotonic() - t0))
    print(f"gpu_check: {counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, "
          f"{counts['skip']} skipped in {time.monotonic() - t0:.0f} s on {info['device']}; {out}/summary.md")
    return 1 if counts["fail"] or counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
