"""``python -m apt_lightning.tools.suite`` = ``apt-ablate``."""

import sys

from apt_lightning.tools.suite.cli import main

sys.exit(main())
