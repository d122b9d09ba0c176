"""What edgeq says to the person at the terminal (stderr), apart from results."""

from __future__ import annotations

import sys


def warn(message: str) -> None:
    """A one-line warning the user should read even without --verbose."""
    print(f"edgeq: warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    """A one-line message on what the compiler decided to do next (not a problem)."""
    print(f"edgeq: {message}", file=sys.stderr)
