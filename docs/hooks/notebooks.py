"""mkdocs hook: a Jupyter notebook for every tutorial script, made from the script at build time.

The scripts `docs/tutorial/*_steps.py` are in jupytext's percent format: `# %%` starts a cell,
`# %% [markdown]` a text cell, `# %% active="ipynb"` a cell that only the notebook runs (commented
out in the script: in a notebook, set TRITON_INTERPRET=1 when there is no GPU, then run every step
in turn) and `# %% active="py"` one that only the script runs (its command line). The notebook is
the script read by jupytext, so the two cannot drift: it is never committed, only built, into
the site as `tutorial/<name>.ipynb`, next to the pages that link to it for download.

tests/test_notebooks.py holds the scripts to the format (jupytext writes each one back unchanged)
and executes every notebook with nbclient, on the CPU through Triton's interpreter.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "docs" / "tutorial").glob("*_steps.py"))
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


def notebook(script: Path):
    """The notebook of a tutorial script (nbformat v4, no outputs)."""
    import jupytext

    nb = jupytext.read(script, fmt="py:percent")
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"  # the same notebook from the same script: no random ids
    nb.metadata["kernelspec"] = KERNEL
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata.pop("jupytext", None)  # a plain notebook: nothing pairs it with a file the reader lacks
    return nb


def on_files(files, config):
    import nbformat
    from mkdocs.structure.files import File

    for script in SCRIPTS:
        text = nbformat.writes(notebook(script))
        files.append(File.generated(config, f"tutorial/{script.stem}.ipynb", content=text))
    return files
