"""Printing for the command-line tools: a line to stdout or stderr that survives a reader
which has gone (``batchnorm bench | head``): the work goes on, its files being the result,
and further output is dropped; on a terminal whose encoding lacks a character of the line, the
character is replaced."""

from __future__ import annotations

import os
import sys

__all__ = ["say"]


def say(msg: str, *, err: bool = False) -> None:
    """Print ``msg`` (to stderr if ``err``); a closed pipe silences the stream instead of
    raising ``BrokenPipeError``."""
    stream = sys.stderr if err else sys.stdout
    try:
        try:
            print(msg, file=stream, flush=True)
        except UnicodeEncodeError:
            # a terminal whose encoding lacks "—" or "±" (latin-1, ascii): the same line with
            # those characters replaced, not a traceback after the work is done
            enc = getattr(stream, "encoding", None) or "ascii"
            print(msg.encode(enc, "replace").decode(enc), file=stream, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
