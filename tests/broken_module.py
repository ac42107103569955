"""A module that fails at import: its tasks must fail once, not be retried."""

raise RuntimeError("this module is broken on purpose")
