"""The README's own commands, as .ci/run runs them: the fenced shell block under "## Set up" and the one
under "## Test", written out as one bash script that runs them line by line, in order.

    python3 .ci/readme_blocks.py --torch "pip install torch==2.13.0" > readme.sh && bash readme.sh

- Only the set-up line that installs torch (`pip install torch ...`, exactly one) is replaced, by --torch.
- As on a fresh Debian or Ubuntu, `python` and `pip` do not exist until a venv is active: the script
  fails on a line that uses them before (Debian ships `python3`; `python` comes with the venv).
- The first line that fails (its exit status, pytest's 5 for "no tests collected" included) ends the
  script with that line quoted and a non-zero exit.

Standard library only: it runs before any venv exists. tests/test_readme.py holds the README to it.
"""

import argparse
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("Set up", "Test")
SHELL_FENCE = re.compile(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
TORCH_LINE = re.compile(r"^pip install torch(\s|$)")


class ReadmeError(Exception):
    """The README lacks what CI runs; the message is one sentence."""


def section(text: str, title: str) -> str:
    """The text of the README's "## <title>" section, up to the next "## " heading."""
    m = re.search(rf"^## {re.escape(title)}[ \t]*$(.*?)(?=^## |\Z)", text, re.S | re.M)
    if not m:
        raise ReadmeError(f'the README has no "## {title}" section, whose shell block CI runs')
    return m.group(1)


def commands(text: str, title: str) -> list[str]:
    """The commands of the first shell block of a section: continuation lines joined, comments kept on
    their line, blank and comment-only lines left out."""
    block = SHELL_FENCE.search(section(text, title))
    if not block:
        raise ReadmeError(f'the README\'s "## {title}" section has no ```bash block, which CI runs')
    found, joined = [], ""
    for line in block.group(1).splitlines():
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1].rstrip() + " "
            continue
        joined += line
        if joined.strip() and not joined.strip().startswith("#"):
            found.append(joined.strip())
        joined = ""
    if not found:
        raise ReadmeError(f'the README\'s "## {title}" block holds no command, and CI runs it')
    return found


def readme_commands(text: str) -> dict[str, list[str]]:
    """{"Set up": [...], "Test": [...]}, checked: one torch line in the set-up."""
    got = {title: commands(text, title) for title in SECTIONS}
    torch_lines = [c for c in got["Set up"] if TORCH_LINE.match(c)]
    if len(torch_lines) != 1:
        raise ReadmeError(f"the README's set-up has {len(torch_lines)} `pip install torch` lines; CI pins exactly one")
    return got


GUARD = '''\
# As on a fresh Debian/Ubuntu: no `python` or `pip` before a venv is active.
python() {
    if [ -n "${VIRTUAL_ENV:-}" ]; then command python "$@"; else
        echo "python does not exist before the venv is active (a fresh Debian or Ubuntu has only python3)" >&2
        return 127
    fi
}
pip() {
    if [ -n "${VIRTUAL_ENV:-}" ]; then command pip "$@"; else
        echo "pip does not exist before the venv is active (a fresh Debian or Ubuntu has no pip)" >&2
        return 127
    fi
}
unset VIRTUAL_ENV
'''


def script(text: str, torch: str) -> str:
    """The bash script that runs the README's set-up and test blocks, line by line."""
    got = readme_commands(text)
    out = ["#!/usr/bin/env bash", "# Written by .ci/readme_blocks.py from README.md: do not edit.", GUARD]
    for title, lines in got.items():
        for line in lines:
            run = torch if title == "Set up" and TORCH_LINE.match(line) else line
            shown = f"README ({title}): {line}" + ("" if run == line else f"   [CI runs: {run}]")
            out += [f"echo {shlex.quote('$ ' + shown)}",
                    "{ " + run,  # the newline ends a trailing comment before the brace closes
                    f"}} || {{ rc=$?; printf '.ci/run: this line of the README failed (exit %s): %s\\n' \"$rc\" "
                    f"{shlex.quote(line)} >&2; exit \"$rc\"; }}"]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 .ci/readme_blocks.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch", required=True, help="the line run instead of the README's `pip install torch ...`")
    ap.add_argument("--readme", default=str(ROOT / "README.md"), help="the README to read (default: this checkout's)")
    args = ap.parse_args(argv)
    try:
        text = Path(args.readme).read_text(encoding="utf-8")
        sys.stdout.write(script(text, args.torch))
    except (OSError, UnicodeDecodeError) as e:
        print(f"{ap.prog}: error: cannot read {args.readme}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    except ReadmeError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
