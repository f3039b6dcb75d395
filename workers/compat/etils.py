"""etils: Orbax's paths (etils.epath) keep one fsspec instance per scheme (an `lru_cache` over
fsspec's own cache), made with the endpoint variables of its day, so a later endpoint in the same
process (another emulator, a notebook's new settings) would never be reached. etils has no public
way to drop that cache; fsspec's own cache is dropped through its public API."""

from __future__ import annotations

import fsspec

WRITTEN_FOR = "1.15.0"
"""The etils release whose `epath.backend._FileSystemSpecBackend._get_filesystem` cache this clears."""
PATCHED = "etils.epath.backend._FileSystemSpecBackend._get_filesystem (cache_clear)"


def forget_filesystems(scheme: str) -> None:
    """Drops the cached filesystems of `scheme`, so the next path of it reads today's endpoint."""
    from etils.epath import backend

    fsspec.get_filesystem_class(scheme).clear_instance_cache()
    getattr(backend._FileSystemSpecBackend._get_filesystem, "cache_clear", lambda: None)()
