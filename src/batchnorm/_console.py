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


def allocation_failure(e: BaseException) -> str | None:
    """The one-line report of ``e`` when it is torch's refusal to allocate a tensor (sizes
    beyond the machine's memory: a user's choice, not a bug), None for any other error."""
    text = str(e)
    if isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in text
    ):
        size = text.split("you tried to allocate ")[-1].split(" bytes")[0]
        need = f" ({int(size) / 2**30:.3g} GiB for one tensor)" if size.isdigit() else ""
        return (
            f"the sizes asked for need more memory than this machine has{need}; choose smaller ones"
        )
    return None
