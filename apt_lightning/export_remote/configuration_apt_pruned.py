"""Configurations of models pruned with APT (apt-lightning), for `trust_remote_code=True` loading.

Each class is its family's transformers configuration under a model type of its own
(``apt_pruned_<family>``), so that transformers refuses the folder without `trust_remote_code` instead
of building the unpruned model with random weights. The sizes in the configuration are those of the model
before pruning; `apt_widths` holds the pruned ones: query heads per KV group and FFN neurons per layer,
the hidden size and the head size (see `modeling_apt_pruned.py`).

This file is copied into every exported folder: it imports only transformers.
"""

from transformers import BertConfig, LlamaConfig, MistralConfig, Qwen2Config, RobertaConfig


class AptPrunedBertConfig(BertConfig):
    model_type = "apt_pruned_bert"


class AptPrunedRobertaConfig(RobertaConfig):
    model_type = "apt_pruned_roberta"


class AptPrunedLlamaConfig(LlamaConfig):
    model_type = "apt_pruned_llama"


class AptPrunedMistralConfig(MistralConfig):
    model_type = "apt_pruned_mistral"


class AptPrunedQwen2Config(Qwen2Config):
    model_type = "apt_pruned_qwen2"
