"""Plot a training run from its metrics.jsonl: the loss curves and the load of every expert.

    python -m minimamba_moe.run.plot out/                      # writes out/run.png
    python -m minimamba_moe.run.plot out/ --out run.svg        # any matplotlib format, by suffix

train.py writes one JSON object per line to ``<out_dir>/metrics.jsonl``: per training step
``step``, ``loss``, ``aux_loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, and for MoE models
``tokens_per_expert`` (one list of E counts per MoE layer) and ``dropped`` (one count per MoE
layer); per evaluation ``step`` and ``val_loss``. Three panels:

1. train and validation loss against step;
2. expert load imbalance per MoE layer, max load / mean load over the layer's experts (1 = every
   expert got the same number of token-slots), smoothed over a few steps;
3. the load of every expert of every MoE layer, as a share of its layer's token-slots, summed
   over the last quarter of the run (a heat map: rows are layers, columns experts).

Needs matplotlib (``pip install -e ".[plots]"``), imported only when plotting.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path


class PlotError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training-step records, evaluation records) of a metrics.jsonl; a torn last line is skipped."""
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise PlotError(f"{path} {what}: pass the out_dir of a train.py run (it holds metrics.jsonl)")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    train, evals = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # a run killed mid-write leaves a torn last line
            raise PlotError(f"{path}:{i + 1} is not JSON: every line of metrics.jsonl must be one JSON object")
        if not isinstance(r, dict) or "step" not in r:
            raise PlotError(f"{path}:{i + 1} has no 'step': is this a metrics.jsonl written by train.py?")
        layers = next((t["tokens_per_expert"] for t in train if t.get("tokens_per_expert")), None)
        check_record(r, layers, f"{path}:{i + 1}")
        (evals if "val_loss" in r and "loss" not in r else train).append(r)
    if not train and not evals:
        raise PlotError(f"{path} holds no records yet: plot it after the run has taken a step")
    return train, evals


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_record(r: dict, layers: list | None, where: str) -> None:
    """Refuse (PlotError) a record whose plotted fields have the wrong type; ``layers``: the first
    record's tokens_per_expert, whose shape every later one must have."""
    def bad(key, expected):
        shown = json.dumps(r[key])
        return PlotError(f"{where} has {key} = {shown if len(shown) < 60 else shown[:57] + '...'}: expected {expected} "
                         "(is this a metrics.jsonl written by train.py?)")

    if not _is_number(r["step"]) or r["step"] < 0:
        raise bad("step", "a step number >= 0")
    for key in ("loss", "val_loss"):
        if r.get(key) is not None and not _is_number(r[key]):
            raise bad(key, "a number or null")
    counts = r.get("tokens_per_expert")
    if counts is None:
        return
    if not (isinstance(counts, list) and counts and all(
            isinstance(layer, list) and layer and all(_is_number(c) and c >= 0 for c in layer) for layer in counts)):
        raise bad("tokens_per_expert", "one list of token counts per MoE layer")
    if layers is not None and [len(layer) for layer in counts] != [len(layer) for layer in layers]:
        raise bad("tokens_per_expert", f"the shape of the first record's, {[len(layer) for layer in layers]} experts")


def _smooth(values: list[float], width: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def imbalance(counts: list[int]) -> float:
    """max / mean of one layer's token-slots per expert (1 = balanced); nan if it saw no tokens."""
    total = sum(counts)
    return max(counts) * len(counts) / total if total else math.nan


def plot_run(run: Path, out: Path) -> Path:
    """Draw the run's figure into ``out`` (written to a temporary file, then renamed)."""
    train, evals = read_metrics(run)
    try:
        import matplotlib
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install -e '.[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if out.is_dir():
        raise PlotError(f"--out {out} is a folder: give the figure's file name, e.g. {out / 'run.png'}")
    if out.suffix[1:].lower() not in formats:
        what = f"a {out.suffix} figure" if out.suffix else "a figure without a suffix"
        raise PlotError(f"cannot write {what} ({out}): end --out with one of .{', .'.join(sorted(formats))}")

    moe = [r for r in train if r.get("tokens_per_expert")]
    # 8 inches wide at 10 pt: legible (13 px text) where the docs show it at its natural width, and
    # still 11-12 px in a 688 px column. MoE runs: loss and imbalance side by side, the shares below.
    style = plt.rc_context({"font.size": 10, "legend.fontsize": 9})  # read as each text is made
    style.__enter__()
    fig = plt.figure(figsize=(8, 6.6) if moe else (5.5, 4))
    grid = fig.add_gridspec(2, 2, height_ratios=(1.25, 1)) if moe else fig.add_gridspec(1, 1)
    ax = fig.add_subplot(grid[0, 0])
    steps = [r["step"] for r in train if r.get("loss") is not None]
    losses = [r["loss"] for r in train if r.get("loss") is not None]
    if steps:
        ax.plot(steps, losses, lw=0.8, alpha=0.4, color="C0")
        ax.plot(steps, _smooth(losses, max(1, len(losses) // 50)), color="C0", label="train loss (smoothed)")
    ev = [r for r in evals if r.get("val_loss") is not None]
    if ev:
        ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", color="C1", ms=3, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if moe:
        n_layers = len(moe[0]["tokens_per_expert"])
        ax = fig.add_subplot(grid[0, 1])
        width = max(1, len(moe) // 50)
        for layer in range(n_layers):
            imb = [imbalance(r["tokens_per_expert"][layer]) for r in moe]
            ax.plot([r["step"] for r in moe], _smooth(imb, width), lw=1, label=f"MoE layer {layer}")
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("max load / mean load")
        ax.set_title("load imbalance (1 = balanced)")
        ax.grid(alpha=0.3)
        ax.legend()
        ax = fig.add_subplot(grid[1, :])
        tail = moe[-max(1, len(moe) // 4):]
        share = []
        for layer in range(n_layers):
            sums = [sum(r["tokens_per_expert"][layer][e] for r in tail) for e in range(len(tail[0]["tokens_per_expert"][layer]))]
            total = sum(sums) or 1
            share.append([s / total for s in sums])
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0)
        ax.set_xticks(range(len(share[0])))
        ax.set_yticks(range(n_layers))
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"share of token-slots, steps {tail[0]['step']}..{tail[-1]['step']}")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    style.__exit__(None, None, None)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=110, metadata={"Date": None} if out.suffix == ".svg" else None)
        os.replace(tmp, out)
    except OSError as e:
        raise PlotError(f"cannot write {out} ({e.strerror or e}): choose another --out") from None
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimamba_moe.run.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a train.py out_dir (or its metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="the figure to write (default: <run>/run.png); format by suffix")
    args = parser.parse_args(argv)
    out = args.out or (args.run if args.run.is_dir() else args.run.parent) / "run.png"
    try:
        print(f"wrote {plot_run(args.run, out)}")
    except PlotError as e:
        print(f"python -m minimamba_moe.run.plot: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
