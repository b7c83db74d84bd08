"""Data: document sources and token shards."""
