"""HL7 v2 pieces shared by the ``hl7-mllp`` and ``hl7-files`` adapters.

- `intake`: the cheap structural check that decides AA or a refusal before the ACK
  (HL7-INTAKE.md rule 15), character-set decoding, escapes, splitting files into
  messages.
- `ack`: original-mode acknowledgements built from the received MSH.
- `runner`: the mapping worker behind the ACK: raw rows -> Records, or quarantine.
- `mapping`: HL7 v2 -> FHIR -> Records (``map_message``).

Nothing here opens a socket or a file: the adapters do that and pass bytes in.
"""
