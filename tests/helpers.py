"""Helpers shared by the tests: comparisons (every mismatch reports max abs and max rel error), and
which optional extras of pyproject.toml are installed (for the ``needs_extra`` marker, see conftest.py)."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# Every sub-package and its folder (tests/test_structure.py checks that no package folder is missing).
PACKAGES = {"minimamba_moe": ROOT / "minimamba_moe", "minimamba_moe.run": ROOT / "minimamba_moe" / "run",
            "minimamba_moe.interop": ROOT / "minimamba_moe" / "interop", "minimamba_moe.reference": ROOT / "reference",
            "minimamba_moe.fast": ROOT / "fast", "minimamba_moe.fast.aot": ROOT / "fast" / "aot"}

# The optional extras of pyproject.toml's [project.optional-dependencies] that tests need, and the
# modules each installs (tests/test_readme.py holds this to pyproject.toml). `dev` is the README's set-up.
EXTRAS = {
    "hf": ("tokenizers", "huggingface_hub"),
    "eval": ("lm_eval",),
    "plots": ("matplotlib",),
    "docs": ("mkdocs", "material", "mkdocstrings", "latex2mathml", "ruff", "jupytext"),
    "docs-test": ("playwright", "jupytext", "nbclient", "ipykernel"),
}


def modules() -> dict[str, Path]:
    """Every module of the package, by its installed name."""
    found = {}
    for package, folder in PACKAGES.items():
        for f in sorted(folder.glob("*.py")):
            found[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return found


def missing_from_extra(extra: str) -> list[str]:
    """The modules of the optional extra ``extra`` that are not installed (none: the extra is installed).

    Only presence is asked: a module that is installed but fails to import fails the test that uses it.
    """
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def max_errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Return (max abs error, max rel error) between two tensors, computed in float64."""
    a = actual.detach().double()
    e = expected.detach().double()
    abs_err = (a - e).abs()
    rel_err = abs_err / e.abs().clamp_min(1e-12)
    return abs_err.max().item() if abs_err.numel() else 0.0, rel_err.max().item() if rel_err.numel() else 0.0


def assert_close(actual, expected, *, atol: float, rtol: float, what: str = "tensor") -> None:
    """torch.testing.assert_close with a message that always names max abs/rel error."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    ok = torch.allclose(actual.detach().double(), expected.detach().double(), atol=atol, rtol=rtol)
    if not ok:
        abs_e, rel_e = max_errors(actual, expected)
        raise AssertionError(
            f"{what}: not close (atol={atol}, rtol={rtol}): max abs err {abs_e:.3e}, max rel err {rel_e:.3e}"
        )


# --- optional packages hidden, offline files in the layouts other libraries use ------------------------------------
HIDE_AND_RUN = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == {name!r} or name.startswith({name!r} + "."):
            raise ImportError("No module named {name!r} (hidden by the test)")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
import runpy
runpy.{run}(sys.argv[0], run_name="__main__"{alter})
"""


def hide_and_run(module: str, script: str) -> list[str]:
    """``[python, -c, ...]`` that runs ``script`` (a file path, or ``-m package.module``) with ``module`` hidden:
    importing it raises ImportError, as where the package is not installed. Append the script's arguments."""
    import sys

    if script.startswith("-m "):
        code = HIDE_AND_RUN.format(name=module, run="run_module", alter=", alter_sys=True")
        return [sys.executable, "-c", code, script[3:]]
    return [sys.executable, "-c", HIDE_AND_RUN.format(name=module, run="run_path", alter=""), script]


def byte_level_bpe_tokenizer(path, vocab_size: int = 300) -> str:
    """A GPT-NeoX-style tokenizer.json (byte-level BPE, <|endoftext|>) trained on a toy text; needs `tokenizers`."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat, the end"] * 20, trainer)
    tok.save(str(path))
    return str(path)


def hub_cache(cache, repo_id: str, files: dict, commit: str = "0123456789abcdef0123456789abcdef01234567") -> None:
    """Put ``files`` (name -> bytes) into a Hugging Face hub cache folder the way huggingface_hub lays it out:
    models--{owner}--{name}/blobs/<sha256>, refs/main holding the commit, snapshots/<commit>/<name> -> blob."""
    import hashlib
    from pathlib import Path

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..") / ".." / "blobs" / blob.name)


TRAIN_TEXT = "the cat sat on the mat. the dog sat on the log. " * 40


def train_tiny(out_dir, steps: int = 40, seed: int = 0) -> None:
    """A small trained checkpoint in seconds: a 2-layer (Mamba, MoE) byte model, AdamW on TRAIN_TEXT until it has
    learnt the sentences (loss about 0.5 nats per byte after 40 steps), saved as train.py saves a model."""
    import torch
    import torch.nn.functional as F

    from minimamba_moe.config import ModelConfig
    from minimamba_moe.model import Model
    from minimamba_moe.run.checkpoint import save_model

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Model(ModelConfig.from_preset("tiny", d_model=32, n_layer=2, n_experts=2, d_expert=64, max_seq_len=64))
    data = torch.tensor(list(TRAIN_TEXT.encode()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (8,), generator=g)
        x = torch.stack([data[s:s + 33] for s in starts])
        out = model(x[:, :-1])
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1)) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(model.eval(), out_dir, tokenizer="bytes")
