"""What every `fusion-llm` command shares: the parser class, help formatting, typed counts."""

from __future__ import annotations

import argparse
import sys

THREADS_HELP = (
    "torch CPU threads (default: torch's own, one per core); 1 is often fastest on a busy "
    "machine with few cores"
)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in its help, unless there is none to show or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, like every other user error."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _at_least(minimum: int):
    """An argparse type: an integer >= `minimum`, else a one-line usage error."""

    def count(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return count


positive_int = _at_least(1)
non_negative_int = _at_least(0)
