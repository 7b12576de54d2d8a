"""Data: embedded datasets, shard resolution, the streaming loader (see DESIGN.md "Data")."""
from genscale.data.builtin import BUILTIN_NAMES, default_cache_dir
from genscale.data.shardset import ShardSet, resolve_data
from genscale.data.stream import make_loader

__all__ = ["BUILTIN_NAMES", "ShardSet", "default_cache_dir", "make_loader", "resolve_data"]
