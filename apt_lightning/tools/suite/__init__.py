"""`apt-ablate`: ablation suites of `apt-fit` runs, their inference measurements and their report.

The command line is `cli` (``python -m apt_lightning.tools.suite``); its docstring lists the parts. This
package's own namespace stays empty so that `apt_lightning.tools.report` can read `layout` without
loading the command line (which imports the report).
"""
