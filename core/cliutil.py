"""What every `maven-edge` subcommand's help has in common: a wrapped description and examples.

    p = add_command(sub, "generate", help="...", description="...",
                    examples=["maven-edge generate --artifacts artifacts/tiny --prompt $'Question: hi\\nAnswer:'"])

Examples are shown exactly as written, so they can be pasted into bash: prompts with newlines use
bash's ``$'...'`` quoting (inside plain double quotes, ``\\n`` stays a backslash and an ``n``).
tests/test_cli.py runs every example through bash and the parser. Torch-free, imports nothing heavy.
"""

from __future__ import annotations

import argparse
import re
import textwrap
from collections.abc import Sequence
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps the paragraphs of a description; keeps indented lines (examples, tables) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in text.strip("\n").split("\n\n"):
            lines = block.splitlines()
            if any(line.startswith(" ") for line in lines) or block.startswith("examples:"):
                blocks.append("\n".join(indent + line for line in lines))
            else:
                blocks.append(textwrap.fill(" ".join(block.split()), width, initial_indent=indent,
                                            subsequent_indent=indent))
        return "\n\n".join(blocks)


def add_command(sub: Any, name: str, *, help: str, description: str, examples: Sequence[str],
                **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser whose help ends with its examples (one command per line)."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    return sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=HelpFormatter,
                          **kwargs)


def positive_float(flag: str) -> Any:
    """An argparse `type` for a number > 0 (refuses 0, negatives, NaN and infinity)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(
                f"{flag} must be > 0, got {text!r} (greedy decoding is the default: leave {flag} out for it)")
        return value

    return parse


def examples_of(parser: argparse.ArgumentParser) -> list[str]:
    """The example command lines of a parser's epilog (after its "examples:" line): comment lines
    dropped, backslash continuations joined, a trailing `&` and `# comment` removed. The section
    ends at the next line that is not indented (another heading, e.g. "then, with any client:")."""
    epilog = parser.epilog or ""
    lines = epilog.split("examples:", 1)[1].splitlines() if "examples:" in epilog else []
    commands, current = [], ""
    for line in lines:
        text = line.strip()
        if text and not line[:1].isspace() and not current:
            break
        if not text or text.startswith("#"):
            continue
        current += text
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        commands.append(re.sub(r"\s+(&\s*)?#.*$|\s+&$", "", current))
        current = ""
    return commands
