"""The command-line tools built on the library (`bench`: apt-bench; `suite`: apt-ablate). They import the
library; the library never imports them."""
