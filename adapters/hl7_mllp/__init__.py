"""The ``hl7-mllp`` adapter: HL7 v2 over MLLP from HIS and LIS senders.

Only its settings exist so far (`settings.Hl7MllpSettings`); framing, listener,
ACKs and mapping follow.
"""
