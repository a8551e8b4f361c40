"""Run by test_mllp_crash.py, which kills it with SIGKILL.

Usage: python mllp_crash_child.py DATA_DIR

Opens the buffer in DATA_DIR, starts the hl7-mllp listener on 127.0.0.1 (port 0) with
its mapping worker (as in production), prints ``PORT <n>`` and serves until killed.
Kept apart from the test module so that a child does not import pytest (start-up time
is most of a trial's).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ADAPTER = "lis-mllp"  # the same as test_mllp_crash.ADAPTER
NODE = "FAC-0001"
LOG_KEY = b"k" * 32


def main(data_dir: str) -> None:
    """Serve MLLP over the buffer in ``data_dir`` until killed."""
    from adapters.hl7_mllp.listener import MllpListener
    from adapters.hl7_mllp.settings import Hl7MllpSettings
    from agent.adapter import AdapterContext
    from agent.buffer import Buffer

    buf = Buffer.open(Path(data_dir), data_key=None)
    ctx = AdapterContext(node_id=NODE, sink=buf, log_key=LOG_KEY)
    settings = Hl7MllpSettings(
        name=ADAPTER, kind="hl7-mllp", listen="127.0.0.1:0", idle_timeout_secs=30.0
    )
    listener = MllpListener(settings, ctx)
    listener.start()
    sys.stdout.write(f"PORT {listener.address[1]}\n")
    sys.stdout.flush()
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1])
