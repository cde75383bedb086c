"""The error types of tcgraph.

Every message says what was asked for, what was found, and what to do, so that the CLI can
print it as one line instead of a traceback. The CLI exits with `EXIT_USAGE` (2, as
argparse does) for a `UsageError` — the command itself asks for something inconsistent
(an option of another backend or planner, two options that exclude each other) — and with
`EXIT_ERROR` (1) for every other `TcgraphError`: a well-formed request that could not be
done (a missing or damaged file, a target out of reach, a backend that is not installed).
"""
from __future__ import annotations

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class TcgraphError(Exception):
    """A user-facing error: bad input, a damaged artifact, a missing backend."""

    exit_code = EXIT_ERROR


class UsageError(TcgraphError):
    """The request itself is inconsistent: fix the command line or the call, not the files."""

    exit_code = EXIT_USAGE
