"""The command-line tools built on the library: `bench` (apt-bench), `suite` (apt-ablate) and `report` (the
ablation report). They import the library; the library never imports them."""
