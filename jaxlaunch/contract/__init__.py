"""The contract between the driver and its host processes: Ray-free, JAX-free, imported by both."""
