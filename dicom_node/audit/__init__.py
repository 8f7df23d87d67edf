"""The audit trail: who did what to which patient's data, when, from where, and how it ended."""
