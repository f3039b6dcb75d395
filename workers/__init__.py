"""The per-host JAX process: one Ray actor per host, each running `workers.train.run_host`."""
