"""A lingering spare's lease (`jaxlaunch.workers.supervision.lease`): the process ends at its deadline,
not before, and a renewal moves the deadline."""

import subprocess
import sys
import time

PROGRAM = """
import sys, time
from jaxlaunch.workers.supervision.lease import Lease
lease = Lease(lambda: print('group ended', flush=True), {first})
{renew}
print(time.monotonic(), flush=True)
sys.stdin.read()  # blocks: only the lease ends this process
"""


def run_until_the_lease_ends(first: float, renew: str = "") -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM.format(first=first, renew=renew)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    set_at = float(proc.stdout.readline())
    assert proc.stdout.readline() == "group ended\n"
    ended = time.monotonic()
    return proc.wait(timeout=60), ended - set_at


def test_a_lease_nobody_renews_ends_the_process_at_its_deadline():
    code, lived = run_until_the_lease_ends(0.5)
    assert code == 0 and lived >= 0.5 - 0.05


def test_a_renewed_lease_ends_the_process_at_the_new_deadline():
    code, lived = run_until_the_lease_ends(0.2, renew="lease.renew(2.0)")
    assert code == 0 and lived >= 2.0 - 0.05
