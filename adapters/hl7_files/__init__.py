"""The ``hl7-files`` adapter: HL7 v2 messages that a LIS or HIS exports as files.

Only its settings exist so far (`settings.Hl7FilesSettings`).
"""
