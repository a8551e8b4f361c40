"""The ``hl7-mllp`` adapter: HL7 v2 over MLLP from HIS and LIS senders.

`framing` decodes MLLP frames from bytes (nothing else); `listener` is the TCP/TLS
server that checks each message structurally, commits it raw, and only then answers
AA (HL7-INTAKE.md); mapping to Records runs behind the ACK (`adapters.hl7.runner`).
"""
