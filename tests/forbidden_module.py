"""Imported only if a test fails: allowed_tasks must refuse paths before importing them."""

IMPORTED = True


def run() -> str:
    return "should never run"
