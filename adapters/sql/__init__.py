"""The ``sql`` adapter: polls a HIS or LIS database for new and changed rows.

Only its settings exist so far (`settings.SqlSettings`).
"""
