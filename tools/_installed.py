"""Installed: every tool's first import -- the shmmmu installed in this Python, or one line saying how to get it.

Run as `python tools/X.py`, a tool has tools/ first on sys.path, not the
checkout above it: it imports the shmmmu that `pip install .` (or `pip install
-e .`) put in this interpreter.  The checkout's own tree is no substitute: its C
helpers (shmmmu._atomics, shmmmu._walker) exist only after an editable install
built them there.  Processes a tool starts go through shmmmu.spawn (`-P`: the
same package, whatever the current directory holds).
"""
from __future__ import annotations

import os
import sys

try:
    import shmmmu._atomics  # noqa: F401
    import shmmmu._walker  # noqa: F401
except ImportError as e:
    sys.exit(f"{os.path.basename(sys.argv[0])}: error: no usable shmmmu in {sys.executable} ({e}): run "
             f"`{sys.executable} -m pip install .` (or `pip install -e .`) in the checkout first")
