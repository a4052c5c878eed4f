"""The command-line tools built on the library (`bench`: apt-bench). They import the library; the library
never imports them."""
