"""Ray: what no public API of Ray 2.60 serves.

- Free resources per node (`ray._private.state.available_resources_per_node`): `ray.nodes()` and
  `ray.available_resources()` give totals and a cluster-wide sum, not what each node has free now,
  which decides whether a host fits.
- Token authentication for a head this process starts with `ray start`: `ray.init(address=...)` uses a
  token only when RAY_AUTH_MODE=token was in the environment when Ray read its configuration (at
  import), and Ray takes the mode from the environment alone (`_system_config` refuses it). So the
  variable is set here, Ray's configuration read again, and the token made if there is none, as
  `ray.init(address="local")` does. The one write of this process's environment after its start.
- A head without prestarted workers (`HEAD_SYSTEM_CONFIG`, given to `ray start --system-config`, a
  hidden option): Ray's raylet starts idle Python workers for each new driver
  (`prestart_worker_first_driver`); a launch's actors never take them (their runtime environment
  differs), so each launch on the embedded instance paid processes importing Ray for nothing (two
  per launch on a 2-core machine, about 0.9 s of CPU of a 12-15 s test launch, measured with a
  process poller).
- The address `ray.init(address="auto")` would join (`ray._private.services.canonicalize_bootstrap_address`:
  RAY_ADDRESS, the newest `ray start` on this machine, a running GCS), so that a launch can refuse one
  where nothing answers before `ray.init` retries it for good."""

from __future__ import annotations

import os

WRITTEN_FOR = "2.60.0"
"""The Ray release whose private modules this uses."""
PATCHED = ("ray._private.state.available_resources_per_node, ray._private.authentication, ray._raylet.Config, "
           "the system config prestart_worker_first_driver, ray._private.services.canonicalize_bootstrap_address")
AUTH_MODE_ENV = "RAY_AUTH_MODE"
HEAD_SYSTEM_CONFIG = {"prestart_worker_first_driver": False}
"""Ray's system configuration for a head this process starts (a raylet refuses a key it does not know)."""


def available_resources_per_node() -> dict[str, dict[str, float]]:
    """Each alive node's free resources, by node id."""
    from ray._private.state import available_resources_per_node as per_node

    return dict(per_node())


def enable_token_auth() -> None:
    """Make this process's later `ray.init(address=...)` authenticate the way the head will."""
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray._raylet import Config  # type: ignore[attr-defined]  # compiled module; its stub lacks Config

    if AUTH_MODE_ENV not in os.environ:  # else it is the user's choice, and the head inherits it
        os.environ[AUTH_MODE_ENV] = "token"
        # Ray read its configuration at import; without this the driver connects without a token, the
        # head refuses it, and ray.init fails after 20 s saying only "Failed to connect to Ray cluster".
        Config.initialize("")
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)


def resolved_address(address: str) -> str:
    """HOST:PORT of the cluster `ray.init(address=address)` would join; ConnectionError if Ray finds none."""
    from ray._private.services import canonicalize_bootstrap_address

    resolved = canonicalize_bootstrap_address(address)
    if resolved is None:
        raise ConnectionError("Ray would start a new local instance")
    return resolved
