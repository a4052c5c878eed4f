"""``python -m apt_lightning.tools.bench`` = ``apt-bench``."""

from apt_lightning.tools.bench.cli import main

main()
