"""The per-host JAX process: one Ray actor per host, each running `jaxlaunch.workers.host.HostActor`."""
