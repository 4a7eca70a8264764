"""MkDocs hook: a line ``<!-- diffmem-help: VERB [ACTION] -->`` in a page becomes the current
``diffmem VERB [ACTION] --help`` text, so the option lists in the docs are the CLI's own."""

from __future__ import annotations

import argparse
import os
import re

_MARK = re.compile(r"^<!-- diffmem-help: ([a-z -]+?) -->$", re.MULTILINE)
_parser: argparse.ArgumentParser | None = None


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    raise KeyError(f"diffmem-help: no sub-command {name!r} under {parser.prog!r}")


def help_text(words: list[str]) -> str:
    global _parser
    if _parser is None:
        os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; fix the width for a stable page
        from diffmem.cli.main import build_parser

        _parser = build_parser()
    parser = _parser
    for word in words:
        parser = _subparser(parser, word)
    return parser.format_help()


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    def replace(match: re.Match) -> str:
        return "```text\n" + help_text(match.group(1).split()).rstrip() + "\n```"

    return _MARK.sub(replace, markdown)
