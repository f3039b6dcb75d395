"""`python -m jaxlaunch ...` is the `jaxlaunch` command."""

import sys

from launcher.cli import main

sys.exit(main())
