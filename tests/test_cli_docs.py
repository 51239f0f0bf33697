"""docs/CLI.md is the whole command line: every command and every flag, with its help text.

It is generated from the argparse parsers, so it cannot drift: after changing a flag, run
`python tests/test_cli_docs.py --write` and commit docs/CLI.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "CLI.md"

HEAD = """# The command line

Every `hwq` command and every flag, generated from the parsers themselves
(`python tests/test_cli_docs.py --write`; a test fails when this page and the code differ).
`hwq COMMAND --help` prints the same. Errors a user can fix are one line on stderr,
`hwq: error: …`, with exit status 2; `-v` (before the command) shows debug logging and
tracebacks.
"""


def _subparsers(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _cell(text: str | None) -> str:
    return " ".join((text or "").replace("|", "\\|").split()).replace("%%", "%")


def render() -> str:
    from pipeline.cli import build_parser

    ap = build_parser()
    helps = {}
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    for choice in sub._choices_actions:
        helps[choice.dest] = choice.help
    out = [HEAD]
    for name, p in _subparsers(ap).items():
        usage = " ".join(p.format_usage().split())
        usage = usage.removeprefix("usage: ")
        out.append(f"## `hwq {name}`\n")
        if helps.get(name):
            out.append(_cell(helps[name]) + ".\n")
        if p.description:
            out.append(_cell(p.description) + "\n")
        out.append(f"```\n{usage}\n```\n")
        out.append("| argument | meaning |\n|---|---|")
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            names = ", ".join(a.option_strings) or a.metavar or a.dest
            if a.option_strings and a.nargs != 0:
                names += " " + (a.metavar or a.dest.upper())
            meaning = _cell(a.help % {"default": a.default} if a.help and "%(" in a.help
                            else a.help)
            if a.choices and not isinstance(a.choices, dict):
                meaning += f" (one of: {', '.join(map(str, a.choices))})"
            out.append(f"| `{names}` | {meaning} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def test_cli_reference_is_current():
    assert DOC.read_text() == render(), (
        "docs/CLI.md differs from the parsers: run `python tests/test_cli_docs.py --write`")


def test_every_flag_is_documented():
    from pipeline.cli import build_parser

    doc = DOC.read_text()
    for name, p in _subparsers(build_parser()).items():
        section = doc.split(f"## `hwq {name}`", 1)[1].split("\n## ", 1)[0]
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            for o in a.option_strings:
                assert f"`{o}" in section or f", {o}" in section, f"hwq {name} {o}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        sys.path.insert(0, str(ROOT))
        DOC.write_text(render())
        print(f"wrote {DOC}")
    else:
        print(render())
