"""A module that takes 10 s to import (S34): a job naming it runs past its timeout while importing."""

import time

time.sleep(10)


def run() -> str:
    return "imported at last"
