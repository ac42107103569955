"""A task module that needs its own after-fork step (as grpc and some drivers do)."""

from __future__ import annotations

import os

forked_child = False


def _in_child() -> None:
    global forked_child
    forked_child = True


os.register_at_fork(after_in_child=_in_child)


def hook_ran() -> bool:
    return forked_child
