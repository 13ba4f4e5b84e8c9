"""The README and docs/ say what the code does: every field, argument and flag they name exists with the
name and default they give, and the sample outputs are what the commands print today."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import re
import subprocess
import sys

import pytest

import fxtile
from fxtile.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return " ".join(f.read().split())  # one line: the README wraps its bullets


def _bullet(text: str, start: str) -> str:
    """The README's API bullet that starts with ``start``, up to the next bullet."""
    at = text.index(f"- `{start}")
    end = text.find(" - ", at + 3)
    return text[at:end if end > 0 else None]


def test_the_readme_names_every_match_field_and_no_other():
    bullet = _bullet(_read("README.md"), "fxtile.find(")
    named = set(re.findall(r"`\.([a-z_]+)`", bullet.split("`.skipped`")[0]))
    fields = {f.name for f in dataclasses.fields(fxtile.Match)}
    properties = {n for n, v in vars(fxtile.Match).items() if isinstance(v, property)}
    assert named == fields | properties, (sorted(named - fields - properties), sorted(fields | properties - named))


def test_the_readme_names_every_skipped_field_and_why():
    bullet = _bullet(_read("README.md"), "fxtile.find(")
    skipped = bullet.split("`.skipped`")[1]
    named = set(re.findall(r"`\.([a-z_]+)`", skipped))
    assert named == {f.name for f in dataclasses.fields(fxtile.Skipped)} - {"path", "pattern"} | {"why", "reason"}
    for why in re.findall(r"`([A-Z_]+)`", skipped):
        assert why in fxtile.Why.__members__, why


@pytest.mark.parametrize("name, obj", [("fxtile.transform", fxtile.transform), ("fxtile.find", fxtile.find),
                                       ("fxtile.ShardPolicy", fxtile.ShardPolicy)])
def test_the_readme_gives_each_signature_with_its_defaults(name, obj):
    bullet = _bullet(_read("README.md"), f"{name}(")
    shown = re.match(rf"- `{re.escape(name)}\((.*?)\)( -> [^`]*)?`", bullet).group(1)
    params = inspect.signature(obj).parameters
    for part in re.split(r",\s*", shown):
        if part in ("*", "model"):
            continue
        key, _, default = part.partition("=")
        assert key in params, (name, key)
        if default and "|" not in default:  # a list of the accepted kinds, not one default
            assert default == repr(params[key].default).replace("'", '"'), (name, key, default)
    assert {k for k in params if k != "model"} <= {re.split("=", p)[0] for p in re.split(r",\s*", shown)}, shown


def _commands(name: str) -> list[str]:
    """Every ``fxtile convert ...`` command line the file shows, up to the end of its code span or comment."""
    with open(os.path.join(ROOT, name)) as f:
        return [re.split(r"`|#|\) ", line[line.index("fxtile convert"):])[0] for line in f if "fxtile convert" in line]


def test_every_convert_flag_the_docs_name_exists():
    convert = build_parser()._subparsers._group_actions[0].choices["convert"]
    known = {flag for action in convert._actions for flag in action.option_strings}
    for name in ("README.md", "docs/convert.md", "docs/planner.md"):
        named = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", " ".join(_commands(name))))
        assert named, f"{name} names no fxtile convert flag: the test would check nothing"
        assert named <= known, (name, sorted(named - known))


def test_fxtile_help_says_what_the_tool_does():
    text = build_parser().format_help()
    assert "MLPs, expert banks and loss head" in text and "convert" in text


def test_the_convert_samples_are_what_it_prints():
    """``python docs/samples.py --check``: rerun every ``fxtile convert`` sample shown in the docs (about 10 s
    each, on meta) and compare; only seconds, timestamps and measured errors are masked."""
    spec = importlib.util.spec_from_file_location("samples", os.path.join(ROOT, "docs", "samples.py"))
    samples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(samples)
    shown = {command for _, command, _ in samples.samples("fxtile convert")}
    assert len(shown) >= 4, shown  # README's Mixtral, convert.md's Llama-3-8B, planner.md's two
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "samples.py"), "--check", "--only", "fxtile convert"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    ran = {line.removeprefix("running ") for line in proc.stderr.splitlines() if line.startswith("running ")}
    assert ran == shown, (ran, shown)
