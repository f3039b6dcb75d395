"""The host's side of the driver's supervision: what it reports (`progress`) and each step's own time
(`step_clock`), the replica checksums (`replica_sums`), the agreed stop (`stops`) and injected faults
(`faults`)."""
