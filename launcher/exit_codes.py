"""The command line's exit codes, shared by the command line and the launch that computes them.

0 finished; 1 the job failed (budget spent, deterministic failure, no capacity, storage, no readable
checkpoint); 2 bad input (one line naming the fix; nothing written or deleted); 130/143 stopped by
SIGINT/SIGTERM after every host saved the same step."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the driver's loop (joining Ray, starting, writing the records at the end): the
    launch unwinds as on a Ctrl-C (its Ray instance, lock and staged code go), and exits 143."""
