"""Integrity: every checksum the pipeline records, and every place one is checked.

seal.py        the sha256 a JSON record carries of itself (its other keys, canonical form), and the
               sha256 of files a record lists (a checkpoint's state.json, an SAE folder's config.json)
manifest.py    the store manifest: its seal, the keys later stages read, and the one manifest hash
               that identifies a store (what a run folder records of the store it trained on)
shard.py       a shard's sha256 against the manifest, checked once per run the first time it is read
checkpoint.py  a training checkpoint's checksums and values
tree.py        whole stores and every store, checkpoint and final SAE under a folder (sae-verify)
"""
