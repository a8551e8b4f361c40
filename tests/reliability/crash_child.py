"""Run by test_buffer_crash.py, which kills it with SIGKILL at a random moment.

Usage: python crash_child.py DATA_DIR TRIAL SEED

Opens the buffer in DATA_DIR, prints ``READY``, then enqueues records for ever through
the public API from the main thread and from three more threads: single puts, multi
record puts, puts with a cursor, async puts and re-puts of records of earlier trials.
After each put *returns* it prints ``ID <record id>`` for every record of that put
(flushed), so every printed id is one the buffer acknowledged.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.buffer import Buffer, Cursor
from agent.record import Service
from tests.factories import make_record

KEY = bytes(range(32))
PER_TRIAL = 1_000_000  # record indexes of trial t are t*PER_TRIAL + ...
PER_THREAD = 100_000

_out = threading.Lock()


def say(line: str) -> None:
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def produce(buf: Buffer, trial: int, worker: int, rnd: random.Random) -> None:
    base = trial * PER_TRIAL + worker * PER_THREAD
    k = 0
    while True:
        kind = rnd.random()
        n = 1 if kind < 0.5 else rnd.randint(2, 12)
        service = Service.IMAGING_STUDY if rnd.random() < 0.2 else Service.LAB_RESULT
        recs = [
            make_record(base + k + j, service=service, body_size=rnd.choice((0, 500, 4000)))
            for j in range(n)
        ]
        k += n
        if trial and rnd.random() < 0.1:
            # Records an earlier (killed) run may or may not have stored: duplicates.
            old = (trial - 1) * PER_TRIAL + rnd.randrange(4) * PER_THREAD + rnd.randrange(20)
            recs.append(make_record(old))
        if kind < 0.2:
            buf.put(recs, cursor=Cursor(f"w{worker}", str(base + k)))
        elif kind < 0.3:
            asyncio.run(buf.put_async(recs))
        else:
            buf.put(recs)
        for r in recs:
            say(f"ID {r.id}")


def main() -> None:
    data_dir, trial, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    buf = Buffer.open(data_dir, data_key=KEY)
    say("READY")
    for w in (1, 2, 3):
        threading.Thread(
            target=produce, args=(buf, trial, w, random.Random(seed * 10 + w)), daemon=True
        ).start()
    produce(buf, trial, 0, random.Random(seed * 10))


if __name__ == "__main__":
    main()
