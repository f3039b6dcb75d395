"""jaxlaunch: `python launch.py --hosts 4` trains a sharded JAX model on 4 hosts driven by Ray."""

import sys

from jaxlaunch.launcher.cli import main

if __name__ == "__main__":
    sys.exit(main())
