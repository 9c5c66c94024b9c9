"""Draw the figures of the docs site from the project's own code and write them as SVG files.

    python docs/figures/make_figures.py            # all figures, into docs/figures/
    python docs/figures/make_figures.py --out DIR  # elsewhere (tests/test_docs.py does this)
    python docs/figures/make_figures.py --only sinkhorn

Each figure is computed, not drawn by hand:
- architecture.svg: the layer stack of three presets from ModelConfig (layer_pattern, n_layer,
  n_experts, top_k, router): the residual stream, where the router and the experts sit.
- chunked_scan.svg: the chunks, the in-chunk associative scan as an up-sweep / down-sweep tree and
  the carried state of the Triton scan, for 20 positions in chunks of BLOCK_L = 8 (fast/scan_triton.py).
- moe_grouping.svg: token-slots grouped by expert by fast/routing.py's group_by_expert on a small
  routing, and the grouped GEMM over the sorted rows.
- sinkhorn.svg: expert load imbalance against router logit sharpness, for every Sinkhorn
  initialisation and stopping rule, with benchmarks/bench_sinkhorn.py's logits and measure.

Needs matplotlib (pip install -e ".[plots]"). The SVGs are deterministic for a given matplotlib
(fixed hash salt, no date), so regenerating them only changes them when the code changes.
"""

import argparse
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

from minimamba_moe import ModelConfig  # noqa: E402

COLORS = {"mamba": "#4c72b0", "moe": "#dd8452", "attention": "#55a868", "mlp": "#8172b3", "router": "#c44e52",
          "norm": "#bbbbbb"}
EXPERT_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def _plt():
    try:
        import matplotlib
    except ImportError:
        sys.exit("matplotlib is not installed: pip install -e '.[plots]'")
    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.hashsalt": "minimamba-moe", "font.size": 9, "font.family": "DejaVu Sans"})
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str):
    path = out / name
    tmp = path.with_suffix(".tmp.svg")
    fig.savefig(tmp, format="svg", bbox_inches="tight", metadata={"Date": None})
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def _box(ax, x, y, w, h, text, color, text_color="white", fontsize=8):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="none"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", color=text_color, fontsize=fontsize)


def _arrow(ax, x0, y0, x1, y1, color="#333333", lw=1.0, style="-|>"):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle=style, color=color, lw=lw,
                                                                    shrinkA=0, shrinkB=0))


# --8<-- [start:architecture]
def architecture(out: Path):
    """One column per preset: the residual stream, and per layer of the pattern its norm and mixer."""
    plt = _plt()
    presets = ["blackmamba-1.5b", "moe-mamba-25m", "transformer-moe-25m"]
    fig, axes = plt.subplots(1, len(presets), figsize=(4.3 * len(presets), 7.6))
    for ax, name in zip(axes, presets):
        c = ModelConfig.from_preset(name)
        pattern, repeats = c.layer_pattern, c.n_layer // len(c.layer_pattern)
        ax.set_xlim(-0.3, 5.0)
        ax.set_ylim(-0.4, 3.2 + 2.2 * len(pattern))
        ax.axis("off")
        ax.set_title(f"{name}\n{c.n_layer} layers = ({', '.join(pattern)}) x {repeats}", fontsize=10)
        top = 2.6 + 2.2 * len(pattern)
        R = 0.6  # x of the residual stream
        ax.plot([R, R], [0.6, top], color="#333333", lw=2.5, zorder=0)
        _box(ax, 0.0, 0.05, 1.2, 0.5, "embedding", "#666666", fontsize=8.5)
        ax.text(1.35, 0.3, "residual stream\n(b, l, d_model)", fontsize=8.5, va="center", color="#333333")
        y = 1.0
        for kind in pattern:
            _box(ax, 1.3, y + 0.2, 1.3, 0.45, c.norm, COLORS["norm"], "black", 8.5)
            _arrow(ax, R, y + 0.42, 1.3, y + 0.42)
            if kind == "moe":
                _box(ax, 1.3, y + 0.9, 1.0, 0.5, f"router\n{c.router}", COLORS["router"], fontsize=8.5)
                _arrow(ax, 1.8, y + 0.65, 1.8, y + 0.9)
                shown = min(c.n_experts, 4)
                for e in range(shown):
                    label = f"E{e}" if e < shown - 1 or c.n_experts == shown else f"E{c.n_experts - 1}"
                    lift = 0.06 if e == shown - 1 and c.n_experts > shown else 0.0  # a gap: experts left out
                    _box(ax, 2.75, y + 0.05 + 0.42 * e + lift, 0.75, 0.34, label, COLORS["moe"], fontsize=8.5)
                    _arrow(ax, 2.3, y + 1.15, 2.75, y + 0.22 + 0.42 * e + lift, color="#999999", lw=0.6)
                ax.text(3.6, y + 0.9, f"{c.n_experts} experts\ntop-{c.top_k}\n"
                        f"{c.mlp_activation}, {c.d_expert}", fontsize=8.5, va="center")
                _arrow(ax, 3.0, y + 1.85, R, y + 1.85)
                ax.plot([3.0, 3.0], [y + 1.75, y + 1.85], color="#333333", lw=1)
                ax.text(1.9, y + 1.92, "+ gate x expert(x)", fontsize=8.5, ha="center")
            else:
                label = {"mamba": f"Mamba\nd_state {c.d_state}", "attention": f"attention\n{c.n_head} heads",
                         "mlp": f"MLP {c.d_ff}"}[kind]
                _box(ax, 1.3, y + 0.95, 1.9, 0.55, label, COLORS[kind])
                _arrow(ax, 1.8, y + 0.65, 1.8, y + 0.95)
                _arrow(ax, 3.2, y + 1.85, R, y + 1.85)
                ax.plot([3.2, 3.2], [y + 1.5, y + 1.85], color="#333333", lw=1)
            ax.scatter([R], [y + 1.85], s=60, color="white", edgecolor="#333333", zorder=3)
            ax.text(R, y + 1.85, "+", ha="center", va="center", fontsize=8, zorder=4)
            y += 2.2
        ax.text(-0.25, 0.9 + 1.1 * len(pattern), f"x {repeats}", fontsize=10, fontweight="bold", rotation=90, va="center")
        ax.plot([-0.05, -0.05], [1.0, y - 0.3], color="#999999", lw=1, ls="--")
        final = c.final_norm if c.final_norm != "none" else "no final norm"
        _box(ax, 0.0, top, 1.5, 0.45, final, COLORS["norm"], "black", 8.5)
        ax.text(1.6, top + 0.22, "-> LM head -> logits", fontsize=8.5, va="center")
    _save(fig, out, "architecture.svg")
    plt.close(fig)
# --8<-- [end:architecture]


def chunked_scan(out: Path):
    """A 20-position sequence in chunks of 8: each chunk's scan tree, the carried state, h_starts.

    Inside a chunk, the (dA, dBu) pairs are combined by an associative scan. The tree drawn is the
    work-efficient order (Brent-Kung: an up-sweep of log2(8) = 3 levels, then a down-sweep of 2):
    every dot is one `_combine` of the pair at the end of its slanted line with the pair above it.
    tl.associative_scan's GPU lowering picks its own order of combines (inside a thread, then across
    lanes); any order gives the same result because the combine is associative. Drawn 7 inches wide
    with 9-point text or larger, so that it is legible at the width of the text column.
    """
    from minimamba_moe.fast.scan_triton import block_sizes

    plt = _plt()
    L = 20
    BL = block_sizes(d=4, n=4, block_l=8)[2]
    n_chunks = math.ceil(L / BL)
    levels = int(math.log2(BL))
    # Brent-Kung: up-sweep level s combines j - 2^s into j for j = 2^(s+1) - 1 (mod 2^(s+1));
    # down-sweep then fills the positions in between, from the largest stride to the smallest.
    up = [[(j - 2 ** s, j) for j in range(2 ** (s + 1) - 1, BL, 2 ** (s + 1))] for s in range(levels)]
    down = [[(j - 2 ** s, j) for j in range(3 * 2 ** s - 1, BL, 2 ** (s + 1))] for s in reversed(range(levels - 1))]
    rows = up + down
    gap, left = 1.3, 5.0  # units between chunks; room for the row labels on the left
    y_in, y_out, y_carry = 0.0, -(len(rows) + 1), -(len(rows) + 2.4)
    fig, ax = plt.subplots(figsize=(7.0, 4.3))
    ax.set_xlim(-left, n_chunks * (BL + gap) - gap + 0.2)
    ax.set_ylim(y_carry - 2.4, 2.3)
    ax.axis("off")
    row_y = [-(i + 1) for i in range(len(rows))]
    ax.text(-left, y_in, "dA, dBu", fontsize=9, va="center")
    ax.text(-left, (row_y[0] + row_y[levels - 1]) / 2, "up-sweep", fontsize=9, va="center", color="#2171b5")
    ax.text(-left, (row_y[levels] + row_y[-1]) / 2, "down-sweep", fontsize=9, va="center", color="#2171b5")
    ax.text(-left, y_out, "prefix", fontsize=9, va="center")
    ax.text(-left, y_carry, "state h", fontsize=9, va="center", color="#e6550d")
    for c in range(n_chunks):
        x0 = c * (BL + gap)
        last = min(L, (c + 1) * BL) - 1
        ax.text(x0 + (BL - 1) / 2, 1.3, f"chunk {c}: t = {c * BL}..{last}", ha="center", fontsize=9)
        for j in range(BL):
            t, x = c * BL + j, x0 + j
            pad = t >= L
            ax.plot([x, x], [y_in, y_out], color="#cccccc", lw=1, zorder=0)  # the wire of position j
            for y in (y_in, y_out):
                ax.add_patch(plt.Rectangle((x - 0.42, y - 0.38), 0.84, 0.76, fc="#eeeeee" if pad else "#c6dbef",
                                           ec="#888888", hatch="///" if pad else None, zorder=2))
            if not pad:
                ax.text(x, y_in, f"{t}", ha="center", va="center", fontsize=8.5, zorder=3)
                ax.text(x, y_out, f"{t}", ha="center", va="center", fontsize=8.5, zorder=3)
        for y, pairs in zip(row_y, rows):
            for src, dst in pairs:
                ax.plot([x0 + src, x0 + dst], [y + 1 - 0.15 if y + 1 < 0 else y_in - 0.38, y], color="#2171b5",
                        lw=1.3, zorder=1)
                ax.scatter([x0 + dst], [y], s=30, color="#2171b5", zorder=3)
        # The carry: h_start enters every position of the chunk; the last position's state leaves.
        hx = x0 - 0.95
        ax.add_patch(plt.Rectangle((hx - 0.5, y_carry - 0.45), 1.0, 0.9, fc="#fdd0a2", ec="#888888", zorder=2))
        ax.text(hx, y_carry, f"h{c}", ha="center", va="center", fontsize=9, zorder=3)
        ax.plot([hx + 0.5, x0 + BL - 1], [y_carry, y_carry], color="#e6550d", lw=1.5, zorder=1)
        for j in range(BL):
            ax.plot([x0 + j, x0 + j], [y_out - 0.38, y_carry], color="#e6550d", lw=0.8, ls=":", zorder=1)
            ax.scatter([x0 + j], [y_carry], s=14, color="#e6550d", zorder=3)
        ax.annotate("", xy=(hx, y_carry - 0.5), xytext=(hx, y_carry - 1.2),
                    arrowprops=dict(arrowstyle="<|-", color="#555555", lw=1))
        if c + 1 < n_chunks:  # the chunk's last state is the next chunk's h_start
            _arrow(ax, x0 + BL - 1, y_carry, x0 + BL + gap - 0.95 - 0.5, y_carry, color="#e6550d", lw=1.5)
    ax.text(-left, y_carry - 1.45, "h_t = A_t h_start + B_t, from the prefix (A_t, B_t) and the chunk's start state;",
            fontsize=9, va="top")
    ax.text(-left, y_carry - 2.15, f"h0..h{n_chunks - 1} (h_starts, (b, {n_chunks}, d, n)) are the only states "
            "written to memory.", fontsize=9, va="top")
    ax.text(-left, 2.1, "one dot = _combine((a, b), (a', b')) = (a a', a' b + b'); hatched: padding, "
            "Δ = 0 so dA = 1, dBu = 0", fontsize=9)
    _save(fig, out, "chunked_scan.svg")
    plt.close(fig)


def moe_grouping(out: Path):
    """group_by_expert on 6 tokens, top-2 of 4 experts, one dropped slot: slots -> sorted rows -> GEMMs."""
    from minimamba_moe.fast.routing import group_by_expert

    plt = _plt()
    expert_idx = torch.tensor([[2, 0], [1, 2], [0, -1], [2, 3], [0, 1], [3, 2]])  # (T, k), -1 = dropped
    T, k = expert_idx.shape
    E = 4
    r = group_by_expert(expert_idx, E)
    N = T * k
    fig, ax = plt.subplots(figsize=(9, 4.4))
    ax.set_xlim(-0.5, 11)
    ax.set_ylim(-2.0, N + 1.2)
    ax.axis("off")

    def color(e):
        return "#dddddd" if e < 0 or e >= E else EXPERT_COLORS[e]

    ax.text(0.6, N + 0.5, "token-slots (T=6, k=2)\nexpert_idx", ha="center", fontsize=8.5)
    for s in range(N):
        e = int(expert_idx.view(-1)[s])
        y = N - 1 - s
        ax.add_patch(plt.Rectangle((0, y), 1.2, 0.8, fc=color(e), ec="white"))
        ax.text(0.6, y + 0.4, f"t{s // k} s{s % k}: " + ("drop" if e < 0 else f"E{e}"), ha="center", va="center",
                fontsize=8.5, color="black" if e < 0 else "white")
    ax.text(4.225, N + 0.5, "sorted rows (order)\nstable sort by expert", ha="center", fontsize=8.5)
    for row in range(N):
        s, e = int(r.order[row]), int(r.sorted_expert[row])
        y = N - 1 - row
        ax.add_patch(plt.Rectangle((3.5, y), 1.45, 0.8, fc=color(e), ec="white"))
        ax.text(4.225, y + 0.4, f"row {row}: x[t{int(r.token[row])}]", ha="center", va="center", fontsize=8.5,
                color="black" if e >= E else "white")
        ax.plot([1.2, 3.5], [N - 1 - s + 0.4, y + 0.4], color="#aaaaaa", lw=0.6)
    offsets = r.offsets.tolist()
    for e in range(E + 1):
        y = N - offsets[e]
        ax.plot([5.05, 5.55], [y, y], color="black", lw=1)
        ax.text(5.6, y, f"offsets[{e}] = {offsets[e]}", va="center", fontsize=8.5)
    ax.text(9, N + 0.5, "grouped GEMM: one weight per\nblock of rows, x gathered by row", ha="center", fontsize=8.5)
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            ax.add_patch(plt.Rectangle((7.6, N - hi), 1.2, hi - lo - 0.2, fc=color(e), ec="white", alpha=0.5))
            ax.text(8.2, N - (lo + hi) / 2 - 0.1, f"rows {lo}..{hi - 1}", ha="center", va="center", fontsize=8.5)
            ax.add_patch(plt.Rectangle((9.1, N - hi), 1.0, hi - lo - 0.2, fc=color(e), ec="white"))
            ax.text(9.6, N - (lo + hi) / 2 - 0.1, f"w1[{e}]", ha="center", va="center", fontsize=8.5, color="white")
            ax.text(8.95, N - (lo + hi) / 2 - 0.1, "@", ha="center", va="center", fontsize=8)
    ax.text(0, -0.5, f"counts = {r.counts.tolist()}; the dropped slot sorts last (key E = {E}) and is never read; "
            "the down projection\nscatters gate x row back into out[token]", fontsize=8.5, va="top")
    _save(fig, out, "moe_grouping.svg")
    plt.close(fig)


def sinkhorn(out: Path):
    """Imbalance of the routes vs the sharpness of the logits, per initialisation and stopping rule."""
    from bench_sinkhorn import RULES, imbalance, make_logits

    from minimamba_moe import fast

    plt = _plt()
    T, E = 4096, 8
    stds = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0]
    argmax_only, results = [], {rule: ([], []) for rule in RULES}
    for std in stds:
        logits = make_logits(T, E, std, "cpu")
        argmax_only.append(imbalance(logits.argmax(1), E))
        for rule in RULES:
            P, n = fast.sinkhorn(logits, init=rule[0], stopping=rule[1], max_iters=100)
            results[rule][0].append(imbalance(P.argmax(1), E))
            results[rule][1].append(int(n))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(stds, argmax_only, "k--", label="argmax of the logits (no Sinkhorn)")
    styles = {("blackmamba", "absolute"): "o-", ("blackmamba", "marginal"): "s-", ("uniform", "absolute"): "^-",
              ("uniform", "marginal"): "v:"}
    for rule, (imb, passes) in results.items():
        label = f"init {rule[0]}, stop {rule[1]}" + (" (as released)" if rule == ("blackmamba", "absolute") else "")
        a1.plot(stds, imb, styles.get(rule, "o-"), label=label, ms=4)
        a2.plot(stds, passes, styles.get(rule, "o-"), label=label, ms=4)
    for a in (a1, a2):
        a.set_xscale("log")
        a.set_xlabel("router logit std (sharper ->)")
        a.grid(alpha=0.3)
    a1.set_ylabel("max load / mean load (1 = balanced)")
    a1.set_title(f"imbalance of the routes, T = {T}, E = {E}")
    a2.set_ylabel("Sinkhorn passes run (cap 100)")
    a2.set_yscale("log")
    a2.set_title("passes until the stopping rule fires")
    a1.legend(fontsize=8.5)
    _save(fig, out, "sinkhorn.svg")
    plt.close(fig)


FIGURES = {"architecture": architecture, "chunked_scan": chunked_scan, "moe_grouping": moe_grouping,
           "sinkhorn": sinkhorn}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    parser.add_argument("--only", choices=FIGURES, action="append", help="draw only this figure (repeatable)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for name in args.only or FIGURES:
        FIGURES[name](args.out)
