"""LoRA-style APT adapters: the layer, injection into a model, merging."""

from apt_lightning.adapters.inject import AdapterConfig, adapter_modules, inject_adapters, merge_adapters
from apt_lightning.adapters.linear import APTLinear

__all__ = ["APTLinear", "AdapterConfig", "adapter_modules", "inject_adapters", "merge_adapters"]
