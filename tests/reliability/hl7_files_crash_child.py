"""Run by test_hl7_files_crash.py, which kills it with SIGKILL.

Usage: python hl7_files_crash_child.py DATA_DIR INBOX MODE ARG

Opens the buffer in DATA_DIR, builds an hl7-files watcher over INBOX, prints
``READY``, then polls until INBOX holds no file, prints ``DONE`` and waits to be
killed. MODE ``point``: ARG is ``<op>:<before|after>#<n>``; the child prints ``KILL
<op>:<when>`` and SIGKILLs itself at the n-th such event (``put_raw``, ``quarantine``,
``link``, ``reason``, ``unlink``). MODE ``free``: the parent kills it after a delay;
this child also runs the mapping worker beside intake. Kept apart from the test module
so that a child does not import pytest (start-up time is most of a trial's).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ADAPTER = "lis-files"  # the same as test_hl7_files_crash.ADAPTER
NODE = "FAC-0001"
LOG_KEY = b"k" * 32


def main(data_dir: str, inbox: str, mode: str, arg: str) -> None:
    """Run the watcher over ``inbox`` until killed; ``mode`` "point" kills itself at
    the ``arg``-th instrumented event, "free" waits for the parent's SIGKILL."""
    from adapters.hl7_files import watcher as wmod
    from adapters.hl7_files.settings import Hl7FilesSettings
    from agent.adapter import AdapterContext
    from agent.buffer import Buffer

    kill_kind, _, nth = arg.partition("#")
    kill_n = int(nth) if mode == "point" else -1
    seen: Counter[str] = Counter()

    def event(kind: str) -> None:
        seen[kind] += 1
        if kind == kill_kind and seen[kind] == kill_n:
            sys.stdout.write(f"KILL {kind}\n")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    class Sink:
        def __init__(self, buf: Buffer) -> None:
            self._buf = buf

        def put_raw(self, *a: Any, **kw: Any) -> Any:
            event("put_raw:before")
            out = self._buf.put_raw(*a, **kw)
            event("put_raw:after")
            return out

        def quarantine(self, *a: Any, **kw: Any) -> Any:
            event("quarantine:before")
            out = self._buf.quarantine(*a, **kw)
            event("quarantine:after")
            return out

        def __getattr__(self, name: str) -> Any:
            return getattr(self._buf, name)

    def around(fn: Any, name: str) -> Any:
        def wrapped(*a: Any, **kw: Any) -> Any:
            event(f"{name}:before")
            out = fn(*a, **kw)
            event(f"{name}:after")
            return out

        return wrapped

    os.link = around(os.link, "link")  # type: ignore[assignment]
    wmod._write_reason = around(wmod._write_reason, "reason")  # type: ignore[assignment]
    wmod._unlink = around(wmod._unlink, "unlink")  # type: ignore[assignment]

    buf = Buffer.open(Path(data_dir), data_key=None)
    ctx = AdapterContext(node_id=NODE, sink=Sink(buf), log_key=LOG_KEY)  # type: ignore[arg-type]
    settings = Hl7FilesSettings(
        name=ADAPTER, kind="hl7-files", directory=Path(inbox), settle_secs=0
    )
    # Timer-killed children also run the mapping worker, writing beside intake as in
    # production; children that kill themselves at a point skip it, to stay quick.
    watcher = wmod.Hl7FilesWatcher(settings, ctx, mapping=mode == "free")
    watcher.start()
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    while any(p.is_file() for p in Path(inbox).iterdir()):
        watcher.poll()
    sys.stdout.write(f"DONE {sum(seen.values())}\n")
    sys.stdout.flush()
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main(*sys.argv[1:5])
