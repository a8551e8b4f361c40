"""The ``dicom`` adapter: studies from a PACS via C-FIND, instances via C-MOVE.

Only its settings exist so far (`settings.DicomSettings`).
"""
