"""``python -m apt_lightning.tools.report SUITE_DIR`` (also ``apt-ablate report SUITE_DIR``)."""

from apt_lightning.tools.report.write import main

main()
