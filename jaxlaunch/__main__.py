"""`python -m jaxlaunch ...` is the `jaxlaunch` command."""

import sys

from jaxlaunch.launcher.cli import main

sys.exit(main())
