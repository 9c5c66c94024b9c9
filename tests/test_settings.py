"""train.py's settings (minimamba_moe/run/settings.py), drawn by Hypothesis: valid -> accepted as given,
invalid -> UsageError, with nothing read or written.

Each draw is one setting with a value inside its range or choices, or one that is not: zero,
negative, nan, inf, huge, a wrong type, an unknown choice. It goes through the command line
(``--key=value``) and a config file (typed TOML/JSON values) into ``configure``; an invalid one
also goes through ``train.main`` with an out_dir that must not appear.
"""

import json
import math
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from minimamba_moe.run.settings import FIELDS, TrainSettings, UsageError, configure  # noqa: E402

NUMERIC = [k for k, f in FIELDS.items() if f.type in ("int", "float")]
CHOICES = [k for k, f in FIELDS.items() if f.metadata["choices"]]


def in_range(key, value):
    m = FIELDS[key].metadata
    lo, hi = m["low"], m["high"]
    return ((lo is None or (value > lo if m["low_open"] else value >= lo))
            and (hi is None or (value < hi if m["high_open"] else value <= hi)))


@st.composite
def a_setting(draw):
    """(key, value as typed, whether it is valid)."""
    key = draw(st.sampled_from(NUMERIC + CHOICES + ["compile", "out_dir"]))
    f = FIELDS[key]
    if f.metadata["choices"]:
        value = draw(st.sampled_from(f.metadata["choices"]) | st.sampled_from(["", "foo", "float16", "TINY", "none"]))
        return key, value, value in f.metadata["choices"]
    if f.type == "bool":
        value = draw(st.booleans() | st.sampled_from(["maybe", 2, 1.5]))
        return key, value, isinstance(value, bool)
    if f.type == "str":
        return key, draw(st.sampled_from([3, 1.5, True])), False  # a string setting given a number
    special = st.sampled_from([0, -1, 1, 2, 10**30, -(10**30), 0.5, -0.5, 1.0, float("nan"), float("inf"),
                               -float("inf"), "x", True, [1]])
    numbers = st.integers(-10**6, 10**6) | st.floats(-1e6, 1e6, allow_nan=False)
    value = draw(special | numbers)
    if f.type == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and in_range(key, value)
    else:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and in_range(key, value))
    return key, value, ok


def command_line(key, value):
    text = json.dumps(value) if isinstance(value, list) else str(value).lower() if isinstance(value, bool) else str(value)
    return f"--{key}={text}"


def valid_as_text(key, value):
    """On the command line every value is text: any text is a valid str setting, and a whole-number
    float ("1e6", "2.0") a valid integer, or True/False ("true") a valid bool."""
    f = FIELDS[key]
    if f.type == "str" and not f.metadata["choices"]:
        return True
    if f.type == "bool":
        return value in (0, 1)  # "1" and "0" read as true and false
    return (f.type in ("int", "float") and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and float(value).is_integer() and in_range(key, value))


def expected(key, value, arg):
    """What configure must give for ``value``: typed as the field (a config file), or read from its text (--key=text)."""
    kind = FIELDS[key].type
    if not arg.startswith("--"):
        return float(value) if kind == "float" else value
    text = arg.split("=", 1)[1]
    read = {"str": str, "float": float, "bool": lambda t: t in ("true", "1"),
            "int": lambda t: int(t) if t.lstrip("-").isdigit() else int(float(t))}
    return read[kind](text)


@given(a_setting())
def test_a_drawn_setting_is_accepted_exactly_when_valid(tmp_path_factory, drawn):
    key, value, ok = drawn
    folder = tmp_path_factory.mktemp("s")
    config_file = folder / "run.json"
    config_file.write_text(json.dumps({key: value}, allow_nan=True))
    for argv in ([command_line(key, value)], [str(config_file)]):
        if ok or (argv[0].startswith("--") and valid_as_text(key, value)):
            s, _ = configure(argv)
            want = expected(key, value, argv[0])
            assert getattr(s, key) == want and type(getattr(s, key)) is type(want), (argv, getattr(s, key))
        else:
            with pytest.raises(UsageError):
                configure(argv)
    if not ok and not valid_as_text(key, value):  # the script itself: a usage error before anything is written
        out = folder / "out"
        with pytest.raises(UsageError):
            train.main([command_line(key, value), f"--out_dir={out}", "--data_cache=" + str(folder / "cache")])
        assert not out.exists() and not (folder / "cache").exists()


def test_every_setting_has_help_and_a_range_or_choices_where_it_can():
    for key, f in FIELDS.items():
        assert f.metadata["help"], key
        if f.type in ("int", "float"):
            assert f.metadata["low"] is not None, f"{key} has no range"
    assert TrainSettings().max_steps == 300 and os.path.basename(TrainSettings().out_dir) == "out"


def test_a_toml_file_on_python_3_10_is_one_usage_error(tmp_path, monkeypatch):
    """requires-python is >=3.10, which has no tomllib: a TOML config file is refused in one sentence
    (a JSON one still works), not an ImportError."""
    toml, as_json = tmp_path / "run.toml", tmp_path / "run.json"
    toml.write_text("lr = 2e-4\n")
    as_json.write_text('{"lr": 2e-4}')
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` raises ImportError, as on 3.10
    with pytest.raises(UsageError, match="needs Python 3.11.*json"):
        configure([str(toml)])
    assert configure([str(as_json)])[0].lr == 2e-4
