"""The control loop's named waits and margins (`jaxlaunch.launcher.control.driver` uses them)."""

CAPACITY_POLL_S = 1.0
STOP_POLL_S = 0.1
"""How often a restart's back-off looks for a stop the user asked for (a signal does not end a sleep)."""
RESIZE_SETTLE_S = 10.0
"""After a resize, how long to wait for the old group's resources to show as free again."""
SECONDARY_GRACE_S = 8.0
"""While every failure seen is a collective error caused by some other host, how long the driver
keeps listening for the root cause."""
HEAR_OUT_S = 0.3
"""After a root cause, how long the driver waits for the rest of the group to end before deciding
(about one poll: a lost node is found by asking for the nodes' liveness, not by waiting)."""
UNRESPONSIVE_AFTER_S = 2.0
"""A host that has not answered a poll for this long, while another host failed, is the one that
hung (a stopped process stalls the others, which the coordination service then fails)."""
NODE_WAIT_S = 30.0
"""How long a dead or unreachable host's node may stay of unknown health before it counts as lost
(Ray's default health checks declare a silent node dead after about 15 s)."""
UNANSWERED_CONFIRM_S = 5.0
"""...and a silent host's node counts as lost (its host silent for NODE_WAIT_S) only once it did not
answer any ask for this long: one probe that timed out on a busy machine is no lost node."""
STOP_MARGIN_STEPS = 2
"""A proposed stop step is this far past the furthest step known (a host past it says so, and a
later step is proposed)."""
PROPOSALS_PER_ROUND = 4
"""How many proposals one drain round makes, each past the hosts' answers to the one before, before
it waits for the next poll. The poll's steps are a poll old: fast steps outran every proposal made a
poll later (a stop asked at step 67 was agreed at 136)."""
MAX_MARGIN_DOUBLINGS = 10
"""The margin doubles with each refused proposal (fast steps outrun a poll), at most this many times."""
STOP_AGREE_S = 60.0
"""How long the hosts may take to agree on a stop step before the stop is carried out without a
save at it (a loop that never calls ctx.maybe_save or ctx.should_stop cannot agree)."""
