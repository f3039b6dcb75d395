"""The host's two checkpoint tiers: `tiered.Tiers` owns them (which tier a save goes to, which a restore
reads), `memory` and `durable` (Orbax) are the tiers, `cadence` when each saves, `part_file`, `keeper`
and `replica_stream` a memory save's one copy and its replica, `persist` the give-up persist."""
