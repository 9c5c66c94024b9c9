"""One prepared check of the kernels, train.py and sample.py on a CUDA GPU, with timings.

    python benchmarks/gpu_check.py --out $OUT/gpu_check                  # on a GPU: about 3-5 minutes
    python benchmarks/gpu_check.py --out /tmp/gc --device cpu --quick    # dry run without a GPU

On the device tool, in one call: ``run(command="python benchmarks/gpu_check.py --out $OUT/gpu_check",
timeout_s=600)``. Estimated wall time on one H100: 3-5 minutes (most of it Triton compiling about 80
kernel variants, ~1-4 s each on one CPU core); the whole run stops at --budget (default 450 s) and
each section at its own cap, so it ends inside the 10-minute call either way. It writes
DIR/summary.json and DIR/summary.md and prints one line; exit status 0 when every check passed (or
when there is no GPU: it says so and writes a summary stating the skip), 1 when one failed or the
run was interrupted, 2 on bad arguments. It needs nothing but this checkout and torch + triton: no
network, no pip install (the checkout's own package is imported, mapped the way pyproject.toml's
package-dir maps it), no `datasets`, no hypothesis.

Sections (each in its own subprocess and process group, so a crash, a hang or a poisoned CUDA
context costs one section, never the run; every failure is caught with its traceback into the
summary). This file is the driver; the first six live in gpu_check_kernels.py, the last three in
gpu_check_runs.py:

    env        torch / triton / numpy / CUDA versions, the device, where the package was imported from
    scan       Triton selective scan forward + backward vs reference/ (run in float64 on the same
               values), fp32 and bf16, small shapes and the papers' d_inner 2304 / 2944 at l = 2048
    step       Triton decode step vs reference, fp32 and bf16 inputs
    moe        Triton MoE forward + backward vs reference, fp32 and bf16: small shapes, BlackMamba's
               8 experts of 3072 / 3872 (top-1), MoE-Mamba's 42 experts (ReLU, capacity drops)
    sinkhorn   the fused Triton Sinkhorn vs reference: P, routes, iteration counts
    model      whole model, fast vs reference backend: logits, every parameter's gradient, bf16
               autocast, and step decoding == forward
    train      train.py in bf16 for a few dozen steps (tiny; blackmamba-1.5b with 4 layers):
               tokens/s, MFU (minimamba_moe/flops.py), peak memory
    sample     sample.py decode ms/token after a 1k and an 8k-token prompt (random weights)
    speed      medians of CUDA-event timings: copy GB/s and dense bf16 matmul TFLOP/s measured here,
               then each kernel's time, GB/s (scan, step, Sinkhorn) or TFLOP/s (MoE) against them,
               and plain PyTorch doing the same work (reference/, torch grouped_mm via fast/moe_cpu.py)

Order and time: the six correctness sections run side by side (--parallel, default all six on a
GPU: their time is mostly Triton compiling, one CPU core per process, and none of them is a
timing), then train, sample and speed one at a time, alone on the GPU. Speed runs last, so it
can only take what is left: while a section runs, RESERVE seconds stay held back for each of
train and sample still to come. Every planned check is in the summary from the start, marked
"not run"; a check that never ran says why (its section's time box, or the run's --budget), and
the summary's first lines list the checks skipped for lack of time. The summary is rewritten
every few seconds, so a run killed from outside still leaves one (its note says it was cut off);
SIGTERM stops the sections and writes the final summary.

Tolerances are the test suite's (tests/test_fast_scan.py, test_triton_moe.py, test_fast_moe.py,
test_fast_sinkhorn.py, test_model.py); each check reports the worst ratio of error to allowed error
(<= 1 passes). The fp32 checks turn TF32 off for matmuls and cuDNN convolutions (torch 2.11
defaults cuDNN's to TF32). ``--device cpu --quick`` runs the same code on small shapes with Triton's
interpreter (fp32 only: the bf16 kernel checks are skipped; Triton 3.6's interpreter needs numpy < 2.4),
so every code path runs before the one GPU run. ``--sections scan,moe`` runs a subset.

Supported versions (pyproject.toml: torch >= 2.6, triton >= 3.2; MIN_VERSIONS below says why; the env
section fails below them). The interpreter tests of the Triton kernels under the oldest claimed Triton:
    python3 -m venv .venv-old && . .venv-old/bin/activate && pip install torch "triton==3.2.0" "numpy<2.4" \
      pytest hypothesis tqdm tiktoken safetensors && pip install --no-deps -e . \
      && python -m pytest -q tests/test_triton_scan.py tests/test_triton_moe.py tests/test_fast_sinkhorn.py
(20 passed with Triton 3.2.0, 3.3.1 and 3.6.0; 3.0.0 fails. Triton 3.6's interpreter needs numpy < 2.4.)
The GPU machine's stack, mimicked on CPU (torch 2.11.0+cu130, triton 3.6.0, safetensors 0.8.0,
numpy 2.3.5; Python 3.11 here, 3.12 there; no datasets, the package not installed): the dry run
passes; with numpy 2.4.6 only the interpreter-run kernel checks fail, as expected.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"minimamba_moe": "minimamba_moe", "minimamba_moe.reference": "reference",
                "minimamba_moe.fast": "fast"}  # pyproject.toml [tool.setuptools.package-dir]
KERNEL_SECTIONS = ("env", "scan", "step", "moe", "sinkhorn", "model")  # gpu_check_kernels.py; run side by side
SECTIONS = KERNEL_SECTIONS + ("train", "sample", "speed")  # gpu_check_runs.py; one at a time, in this order
# Seconds each section may run: about twice the estimates for one H100 in docs/benchmarks.md ("The one GPU
# check"); and what stays held back for train and sample while a section before them runs.
CAPS = dict(env=60, scan=120, step=60, moe=120, sinkhorn=60, model=120, train=150, sample=90, speed=150)
RESERVE = dict(train=60, sample=45)
MIN_BOX = 5.0  # a section with less time than this is not started
STATUSES = ("pass", "fail", "error", "skip")
NOT_RUN = "not run"  # the reason of a planned check's placeholder row starts with this
BOX_RAN_OUT = "the section's time box ran out before this check"
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


def not_run(section, name, why) -> dict:
    """The row of a check that did not run; ``why`` finishes the sentence "not run: ..."."""
    return row(section, name, "skip", reason=f"{NOT_RUN}: {why}")


def skipped_for_time(r) -> bool:
    reason = str(r["metrics"].get("reason", ""))
    return r["status"] == "skip" and reason.startswith(NOT_RUN) and ("time box" in reason or "--budget" in reason)


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e3 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def write_summary(out_dir: Path, rows: list[dict], info: dict) -> dict:
    """summary.json and summary.md in out_dir, each written to a temporary file then renamed; returns counts."""
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    late = [f"{r['section']}: {r['name']}" for r in rows if skipped_for_time(r)]
    data = dict(info, counts=counts, skipped_for_time=late, rows=rows)
    lines = [f"# gpu_check: {info.get('device', '?')}", "",
             f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, {counts['skip']} skipped "
             f"in {info.get('wall_s', 0):.0f} s" + (f". {info['note']}" if info.get("note") else "."), ""]
    if late:
        lines += [f"Not run for lack of time ({len(late)}): " + "; ".join(late) + ".", ""]
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


class Check(NamedTuple):
    """One planned check: ``fn(*args, **kwargs) -> dict`` of metrics ('ok': False makes it fail; 'skip': a
    reason, finishing "not run: ...", makes it a skip, e.g. a time box of its own ran out)."""

    name: str
    fn: Callable
    args: tuple = ()
    kwargs: dict = {}


def check(name, fn, *args, **kwargs) -> Check:
    return Check(name, fn, args, kwargs)


class Ctx:
    """What a section needs: the device, quick mode, its deadline, and where its rows go (one JSON line each)."""

    def __init__(self, section, device, quick, deadline, results_path):
        self.section, self.device, self.quick, self.deadline = section, device, quick, deadline
        self.results_path = results_path
        self.cuda = device.startswith("cuda")

    def emit(self, r):
        with open(self.results_path, "a") as f:
            f.write(json.dumps(r) + "\n")

    def run(self, plan):
        """A section's plan (Checks, and rows such as skips) -> rows: every check first written as not run
        (the row that stands if the section is killed before reaching it), then run in order."""
        plan = list(plan)
        for item in plan:
            self.emit(item if isinstance(item, dict) else not_run(self.section, item.name, BOX_RAN_OUT))
        for item in plan:
            if not isinstance(item, dict):
                self.check(item.name, item.fn, *item.args, **item.kwargs)

    def check(self, name, fn, *args, **kwargs):
        """Run fn -> dict of metrics (with 'ok' for checks); one row, whatever happens."""
        import torch

        if time.monotonic() > self.deadline:
            return self.emit(not_run(self.section, name, BOX_RAN_OUT))
        t0 = time.monotonic()
        # If the section is killed during this check, this row stands (the parent keeps a name's last row).
        self.emit(row(self.section, name, "error", error="did not finish: the section was killed at its time box"))
        try:
            metrics = fn(*args, **kwargs)
            if self.cuda:
                torch.cuda.synchronize()
            if "skip" in metrics:
                return self.emit(not_run(self.section, name, metrics["skip"]))
            status = "pass" if metrics.pop("ok", True) else "fail"
            self.emit(row(self.section, name, status, time.monotonic() - t0, **metrics))
        except Exception:  # noqa: BLE001 - every failure goes into the summary, the run goes on
            self.emit(row(self.section, name, "error", time.monotonic() - t0, error=traceback.format_exc()))
        finally:
            if self.cuda:
                torch.cuda.empty_cache()


def section_plan(ctx: Ctx) -> list:
    """The section's plan (Checks and rows), built without running anything (the parent lists every check
    with a Ctx of its own); its checks see ``ctx`` (device, quick, deadline) when they run."""
    use_checkout()
    module = "gpu_check_kernels" if ctx.section in KERNEL_SECTIONS else "gpu_check_runs"
    return list(getattr(importlib.import_module(module), f"section_{ctx.section}")(ctx))


def planned_rows(section, device, quick) -> list[dict]:
    """Every row the section will write, each check as not run yet; one row if the plan cannot be built."""
    try:
        plan = section_plan(Ctx(section, device, quick, float("inf"), os.devnull))
    except Exception as e:  # noqa: BLE001 - the section itself will report it
        return [not_run(section, "section", f"the run ended before this section ({type(e).__name__}: {e})")]
    return [item if isinstance(item, dict) else not_run(section, item.name, "the run ended before this check "
                                                        "(it was cut off from outside)") for item in plan]


def merge(planned: list[dict], got: list[dict]) -> list[dict]:
    """planned rows, each replaced by the row of the same name that the section wrote; extra rows last."""
    by_name = {r["name"]: r for r in got}
    names = {r["name"] for r in planned}
    return [by_name.get(r["name"], r) for r in planned] + [r for r in got if r["name"] not in names]


def read_rows(path: Path) -> list[dict]:
    """A section's rows (JSON lines), keeping each check's last row: its result, or "did not finish"."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut off when the section was killed mid-write
            pass
    return list({r["name"]: r for r in rows}.values())


# ---------------------------------------------------------------------------------------------------
# the driver: which section runs when, and for how long


def order(sections) -> list[str]:
    """The sections to run, in SECTIONS order whatever order they were given in."""
    return [s for s in SECTIONS if s in sections]


def time_box(section, plan, now, deadline) -> float:
    """Seconds ``section`` may run: its cap, within what the budget leaves after holding back RESERVE for
    each of train and sample planned after it (sections before it in the plan have started already)."""
    held = sum(RESERVE.get(s, 0) for s in plan[plan.index(section) + 1:])
    return min(CAPS[section], deadline - now - held)


class Running(NamedTuple):
    proc: subprocess.Popen
    results: Path
    log: Path
    started: float
    timeout: float


def launch(section, args, tmp, timeout) -> Running:
    """Start a section's subprocess, in its own process group (its own subprocesses die with it)."""
    results, log = Path(tmp) / f"{section}.jsonl", Path(tmp) / f"{section}.log"
    scratch = Path(tmp) / f"{section}_tmp"  # the section's checkpoints and data: removed with tmp at the end
    scratch.mkdir(exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", args.out, "--device", args.device,
           "--section-child", section, "--results", str(results), "--deadline-s", str(max(1.0, timeout - 3))]
    cmd += ["--quick"] if args.quick else []
    env = dict(child_env(args.device, tmp), TMPDIR=str(scratch))
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Running(proc, results, log, time.monotonic(), timeout)


def stop(run: Running) -> None:
    """Kill a section's process group (the section and anything it started: train.py, sample.py)."""
    try:
        os.killpg(run.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    run.proc.wait()


def is_placeholder(r) -> bool:
    return r["status"] == "skip" and str(r["metrics"].get("reason", "")).startswith(NOT_RUN)


def unreached(section, rows, why) -> list[dict]:
    """rows, each check still a placeholder now marked not run for ``why``."""
    return [not_run(section, r["name"], why) if is_placeholder(r) else r for r in rows]


def finish(section, run: Running, planned: list[dict], killed: str | None = None, why: str | None = None) -> list[dict]:
    """The section's rows once its process has ended: its own, and its unreached checks with ``why`` (by
    default: its time box if it was ``killed``, else its process's early exit)."""
    code = run.proc.returncode
    tail = run.log.read_text(errors="replace")[-4000:] if run.log.exists() else ""
    if killed:
        why, problem = why or f"the section's time box of {run.timeout:.0f} s ran out before this check", killed
    elif code != 0:
        why, problem = "the section's process exited before this check", f"section process exited {code}"
    else:
        why = problem = None
    rows = merge(planned, read_rows(run.results))
    rows = unreached(section, rows, why) if why else rows
    if problem:
        rows.append(row(section, "section process", "error", time.monotonic() - run.started,
                        error=f"{problem}; its output ends with:\n{tail}"))
    return rows


def run_plan(args, planned: dict, write: Callable, launcher=launch, poll_s=0.5, write_every_s=5.0) -> dict:
    """Run the sections: the correctness ones side by side (at most args.parallel), then the rest one at a time.

    planned: section -> its rows as not run. write(rows by section, note) is called every write_every_s
    and at the end. Returns the rows by section. SIGTERM (or Ctrl-C) stops every running section.
    """
    plan = list(planned)
    deadline = args.t0 + args.budget
    waiting, running, done = list(plan), {}, {}
    last_write = 0.0

    def snapshot():
        return {s: done.get(s) or (merge(planned[s], read_rows(running[s].results)) if s in running else planned[s])
                for s in plan}

    try:
        while waiting or running:
            now = time.monotonic()
            for s, r in list(running.items()):
                killed = None
                if r.proc.poll() is None and now - r.started > r.timeout:
                    stop(r)
                    killed = f"section killed at its time box of {r.timeout:.0f} s"
                if r.proc.poll() is not None:
                    stop(r)  # whatever it started and left behind must not hold the GPU for the next section
                    done[s] = finish(s, running.pop(s), planned[s], killed)
            while waiting:
                s = waiting[0]
                side_by_side = s in KERNEL_SECTIONS and all(t in KERNEL_SECTIONS for t in running)
                if running and not (side_by_side and len(running) < args.parallel):
                    break
                waiting.pop(0)
                box = time_box(s, plan, time.monotonic(), deadline)
                if box < MIN_BOX:
                    why = f"the run's --budget of {args.budget:.0f} s was spent before this section started"
                    done[s] = unreached(s, planned[s], why)
                    continue
                running[s] = launcher(s, args, args.tmp, box)
            if time.monotonic() - last_write > write_every_s:
                write(snapshot(), f"partial: written while {', '.join(running) or 'starting'} ran; if this note "
                                  "is still here, the run was cut off")
                last_write = time.monotonic()
            if running:
                time.sleep(poll_s)
            if SIGTERM_SEEN:
                raise Interrupted("SIGTERM")
    except (KeyboardInterrupt, Interrupted) as e:
        for s, r in list(running.items()):
            stop(r)
            done[s] = finish(s, running.pop(s), planned[s], f"section stopped: the run was interrupted ({e!r})",
                             why="the run was interrupted before this check")
        rows = snapshot()
        for s in waiting:
            rows[s] = unreached(s, planned[s], "the run was interrupted before this section")
        write(rows, f"interrupted ({e!r}): the sections after the interruption did not run")
        raise
    return snapshot()


class Interrupted(Exception):
    """SIGTERM arrived (e.g. the device call's time limit)."""


SIGTERM_SEEN = []  # set by the handler; run_plan checks it between polls (never mid-write)


def _on_sigterm(signum, frame):
    SIGTERM_SEEN.append(signum)


# ---------------------------------------------------------------------------------------------------
# the command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"gpu_check.py: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for summary.json and summary.md (created)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu: a dry run through Triton's interpreter")
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {', '.join(SECTIONS)} (run in that order)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    ap.add_argument("--parallel", type=int, default=0,
                    help="correctness sections run side by side (default 0: all six on a GPU, 2 on the CPU)")
    ap.add_argument("--section-child", help=argparse.SUPPRESS)  # internal: run one section in this process
    ap.add_argument("--results", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-s", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        ap.error(f"unknown section {bad[0]!r}: choose from {', '.join(SECTIONS)}" if bad else
                 f"--sections is empty: choose from {', '.join(SECTIONS)}")
    if args.device not in ("cuda", "cpu") and not re.fullmatch(r"cuda:\d+", args.device):
        ap.error(f"--device {args.device}: use cuda, cuda:N or cpu")
    if not args.budget > 0:
        ap.error("--budget must be a positive number of seconds")
    if args.parallel < 0:
        ap.error("--parallel must be 0 (auto) or a number of sections")
    args.sections = order(sections)
    args.parallel = args.parallel or (len(KERNEL_SECTIONS) if args.device.startswith("cuda") else 2)
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


def child_env(device, tmp):
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # the kernels on CPU tensors; must be set before triton is imported
    if "TRITON_CACHE_DIR" not in env:  # one compile cache for every section; ~/.triton/cache if writable
        home = Path.home() / ".triton" / "cache"
        try:
            home.mkdir(parents=True, exist_ok=True)
            ok = os.access(home, os.W_OK)
        except OSError:
            ok = False
        if not ok:
            env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton_cache")
    return env


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.section_child:  # inside a section's subprocess
        use_checkout()
        import torch

        torch.manual_seed(0)
        ctx = Ctx(args.section_child, args.device, args.quick, time.monotonic() + args.deadline_s, args.results)
        if args.device == "cpu":
            torch.set_num_threads(min(2, torch.get_num_threads()))
        ctx.run(section_plan(ctx))
        return 0

    out = Path(args.out)
    check_out(out)
    args.t0 = time.monotonic()
    import torch

    info = dict(command=" ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
                started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), torch=torch.__version__,
                python=sys.version.split()[0], quick=args.quick, budget_s=args.budget)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        reason = "no CUDA GPU here (torch.cuda.is_available() is False)"
        rows = [row(s, "section", "skip", reason=reason) for s in args.sections]
        write_summary(out, rows, dict(info, device="none", wall_s=time.monotonic() - args.t0,
                                      note=f"Nothing checked: {reason}. Run it on a GPU, or --device cpu --quick"))
        print(f"gpu_check: skipped, {reason}; summary in {out}/summary.md (a dry run: --device cpu --quick)")
        return 0
    cuda = args.device.startswith("cuda")
    info["device"] = torch.cuda.get_device_name(torch.device(args.device)) if cuda else "cpu (Triton interpreter)"

    planned = {s: planned_rows(s, args.device, args.quick) for s in args.sections}

    def write(by_section, note=None):
        rows = [r for s in args.sections for r in by_section[s]]
        return write_summary(out, rows, dict(info, wall_s=time.monotonic() - args.t0, note=note))

    write(planned, "starting: every planned check is listed as not run yet; if this note is still here, the run was "
                   "cut off")
    signal.signal(signal.SIGTERM, _on_sigterm)
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as args.tmp:
        try:
            by_section = run_plan(args, planned, write)
        except (KeyboardInterrupt, Interrupted):
            interrupted = True
    if interrupted:
        print(f"gpu_check: interrupted after {time.monotonic() - args.t0:.0f} s; partial summary in {out}/summary.md")
        return 1
    rows = [r for s in args.sections for r in by_section[s]]
    # MFU against the matmul measured in this run, beside the nominal peak
    matmul = next((r["metrics"].get("TFLOPs") for r in rows if r["name"].startswith("dense matmul")), None)
    for r in rows:
        achieved = r["metrics"].get("model_TFLOPs")
        if r["section"] == "train" and isinstance(matmul, float) and isinstance(achieved, float):
            r["metrics"]["of_measured_matmul"] = achieved / matmul
    counts = write_summary(out, rows, dict(info, wall_s=time.monotonic() - args.t0))
    late = sum(skipped_for_time(r) for r in rows)
    print(f"gpu_check: {counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, "
          f"{counts['skip']} skipped ({late} for lack of time) in {time.monotonic() - args.t0:.0f} s on "
          f"{info['device']}; {out}/summary.md")
    return 1 if counts["fail"] or counts["error"] else 0


if __name__ == "__main__":
    sys.modules.setdefault("gpu_check", sys.modules["__main__"])  # the section modules import this one back
    sys.exit(main())
