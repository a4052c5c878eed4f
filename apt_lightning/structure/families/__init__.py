"""One module per model family; importing this package registers them all."""

from apt_lightning.structure.families import bert, llama  # noqa: F401
