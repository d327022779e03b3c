"""The activation store (store.py), its shuffled streaming reader (reader.py) and how its rows reach the
training device (transfer.py: pinned buffers, side-stream copies, the gather on the device), text packing (text.py)
and harvest's shard buffers (shards.py). A store that grows or lives elsewhere: where shards come from
(source.py; remote.py for fsspec URLs), following a manifest as a harvest writes it (follow.py), the
one-pass reader over it (stream.py), and bounded disk's consumer records (consumers.py)."""
