"""Naming this process after what it serves, so ``ps`` and ``top`` tell the syncers apart.

A machine running several syncers (the demo, a test, a node debugged by hand) otherwise shows
``python -m image_syncer.syncerproc 3`` for each. :func:`set_title` uses ``setproctitle`` when it
is installed (the whole command line, as ``ps`` shows it), else Linux's ``prctl(PR_SET_NAME)``
through ctypes (the 15-character name ``top`` and ``ps -o comm`` show); elsewhere it does
nothing. A title is a convenience: no failure here stops the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import sys

__all__ = ["set_title"]

_PR_SET_NAME = 15
# Linux keeps 16 bytes for a thread's name, the terminating NUL included.
_COMM_BYTES = 15


def set_title(title: str, short: str) -> str:
    """Set the process title to ``title`` (or its name to ``short``); which one was set."""
    try:
        module = importlib.import_module("setproctitle")
    except ImportError:
        pass
    else:
        module.setproctitle(title)
        return title
    if not sys.platform.startswith("linux"):
        return ""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        name = short.encode()[:_COMM_BYTES]
        if libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0) != 0:
            return ""
    except OSError:
        return ""
    return name.decode(errors="replace")
