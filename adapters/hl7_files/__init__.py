"""The ``hl7-files`` adapter: HL7 v2 messages that a LIS or HIS exports as files.

- `settings`: `Hl7FilesSettings`, the ``[[adapters]]`` options (``kind = "hl7-files"``).
- `watcher`: `Hl7FilesWatcher` (built by ``watcher.build``), a Poller: each poll takes
  the files of ``directory`` that stopped changing, stores their messages raw (the same
  intake check as MLLP, `adapters.hl7.intake`) or quarantines the refused ones, then
  moves each file to ``done_dir``, or to ``failed_dir`` with a ``.reason`` file; its
  ``start()``/``stop()`` run the mapping worker (`adapters.hl7.runner`) behind.
  A kill -9 anywhere neither loses nor doubles a message (see the watcher's doc).
"""
