"""The one error type of tcgraph.

Every message says what was asked for, what was found, and what to do, so that
the CLI can print it as one line instead of a traceback.
"""
from __future__ import annotations


class TcgraphError(Exception):
    """A user-facing error: bad input, a damaged artifact, a missing backend."""
