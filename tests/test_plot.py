"""`python -m minimamba_moe.run.plot`: a run's metrics.jsonl becomes a figure; bad input gets one line.

The command shown on the Training page is run here as a subprocess on a metrics.jsonl written the
way train.py writes it (two MoE layers of 4 experts, evaluations between steps, a torn last line as
a killed run leaves). Drawing needs matplotlib (the `plots` extra): those tests are marked
`needs_extra("plots")` and skipped, saying so, without it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minimamba_moe.run.plot import imbalance, main, read_metrics

ROOT = Path(__file__).resolve().parent.parent


def write_run(folder: Path, steps=40, torn=True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": 0, "val_loss": 5.5})]
    for s in range(1, steps + 1):
        lines.append(json.dumps({"step": s, "loss": 5.5 / s ** 0.3, "aux_loss": 0.0, "lr": 1e-3, "grad_norm": 1.0,
                                 "tokens_per_s": 1000.0, "tokens_per_expert": [[s, 10, 10, 20 - s % 5], [9, 9, 9, 9]],
                                 "dropped": [0, 0]}))
        if s % 10 == 0:
            lines.append(json.dumps({"step": s, "val_loss": 5.5 / s ** 0.3 + 0.1}))
    text = "\n".join(lines) + "\n" + ('{"step": 41, "loss": 1.' if torn else "")
    (folder / "metrics.jsonl").write_text(text)
    return folder


def plot(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "minimamba_moe.run.plot", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_reads_steps_and_evaluations_and_skips_a_torn_last_line(tmp_path):
    train, evals = read_metrics(write_run(tmp_path / "out"))
    assert [r["step"] for r in train] == list(range(1, 41))
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]


def test_imbalance_is_max_over_mean():
    assert imbalance([5, 5, 5, 5]) == 1.0
    assert imbalance([8, 0, 0, 0]) == 4.0
    assert imbalance([3, 1]) == 1.5


@pytest.mark.needs_extra("plots")
def test_the_page_command_draws_the_run(tmp_path):
    run = write_run(tmp_path / "out")
    r = plot(run)  # the Training page's command: python -m minimamba_moe.run.plot out/
    assert r.returncode == 0, r.stderr
    png = run / "run.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, r.stdout
    svg = tmp_path / "fig" / "run.svg"
    r = plot(run / "metrics.jsonl", "--out", svg)
    assert r.returncode == 0 and svg.read_text().lstrip().startswith("<?xml"), r.stderr
    assert not list(run.glob(".*tmp*")) and not list(svg.parent.glob(".*tmp*")), "temporary file left behind"


@pytest.mark.parametrize("content,needle", [
    (None, "does not exist"),
    ("a folder", "metrics.jsonl is not a file"),
    ("not json\n{\"step\": 1, \"loss\": 2.0}\n", "is not JSON"),
    ("[1, 2]\n{\"step\": 1}\n", "has no 'step'"),
    ("", "holds no records"),
    ('{"step": 1, "loss": "abc"}\n{"step": 2, "loss": 1.0}\n', ':1 has loss = "abc"'),
    ('{"step": "x", "loss": 1.0}\n{"step": 2, "loss": 1.0}\n', ':1 has step = "x"'),
    ('{"step": 1, "val_loss": [1]}\n{"step": 2, "loss": 1.0}\n', ":1 has val_loss = [1]"),
    ('{"step": 1, "loss": 1, "tokens_per_expert": 5}\n{"step": 2, "loss": 1.0}\n', ":1 has tokens_per_expert = 5"),
    ('{"step": 1, "loss": 1, "tokens_per_expert": [[1, 2], [3, 4]]}\n'
     '{"step": 2, "loss": 1, "tokens_per_expert": [[1, 2]]}\n', ":2 has tokens_per_expert = [[1, 2]]"),
    ('{"step": 1, "loss": 1, "tokens_per_expert": [[1, 2, 3]]}\n'
     '{"step": 2, "loss": 1, "tokens_per_expert": [[1, 2]]}\n', ":2 has tokens_per_expert = [[1, 2]]"),
], ids=["missing", "dir", "not-json", "no-step", "empty", "loss-str", "step-str", "val-list", "tpe-int", "tpe-layers",
        "tpe-experts"])
def test_bad_input_gets_one_line(tmp_path, capsys, content, needle):
    run = tmp_path / "out"
    run.mkdir()
    if content == "a folder":
        (run / "metrics.jsonl").mkdir()
    elif content is not None:
        (run / "metrics.jsonl").write_text(content)
    rc = main([str(run)])  # in-process: the same main() the command runs
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
    assert lines[0].startswith("python -m minimamba_moe.run.plot: error: ")
    assert not (run / "run.png").exists()


@pytest.mark.parametrize("out, needle", [
    ("run.foo", "cannot write a .foo figure"),
    ("run", "cannot write a figure without a suffix"),
    (".", "is a folder"),
    ("/proc/no/such/dir/run.png", "cannot write"),
], ids=["unknown-format", "no-suffix", "a-folder", "unwritable"])
@pytest.mark.needs_extra("plots")
def test_a_figure_that_cannot_be_written_is_one_line(tmp_path, capsys, out, needle):
    run = write_run(tmp_path / "out")
    rc = main([str(run), "--out", str(tmp_path / out) if not out.startswith("/") else out])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["metrics.jsonl", "out"], "a figure or temporary file was left"
