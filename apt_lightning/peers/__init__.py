"""Peer baselines that APT is measured against: other pruning methods run inside the same training recipe
(docs/method.md, "Peers"). Torch-Pruning is optional (`pip install 'apt-lightning[peers]'`): it is imported
when a peer is created."""

from apt_lightning.peers.torch_pruning import TorchPruningPeer, final_counts, keep_top, taylor_scores

__all__ = ["TorchPruningPeer", "final_counts", "keep_top", "taylor_scores"]
