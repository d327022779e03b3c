"""The activation store (store.py), its shuffled streaming reader (reader.py), text packing (text.py)
and harvest's shard buffers (shards.py)."""
