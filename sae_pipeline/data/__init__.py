"""The activation store and everything that reads or writes it.

store.py           the store: safetensors shards + a manifest, written atomically, read back safely
shards.py          harvest's side of the store: rows collected per shard, what identifies a store
parts.py           a harvest split into parts (torchrun, SLURM arrays): who writes which shard, merging
text.py            text in, packed token contexts out: datasets, the held-out split, tokenization
tensors.py         `data=tensors`: examples in a safetensors file, split into harvest and held-out parts
lm_harvest.py      sae-harvest for a language model: packed contexts through the model, rows per hook
tensor_harvest.py  sae-harvest for `model=torch_module data=tensors`: one store row per example
reader.py          the shuffled, resumable streaming reader over a store
transfer.py        how a window's rows reach the training device: reused (pinned) buffers, side-stream copies, the gather there
serial.py          the reading threads' torch ops run inline, not on torch's intra-op team
paired.py          the shuffled reader over two stores at once (a transcoder's input and target rows)
aligned.py         rows of two stores matched by (context id, position)
source.py          where a store's manifest and shards come from, for readers that follow or fetch it
remote.py          stores at fsspec URLs (s3://, gs://)
follow.py          following a store that is still being harvested
stream.py          one shuffled pass over a store that may still be harvested (`train.stream=true`)
consumers.py       bounded disk (`harvest.keep_shards=N`): who reads a store and which shards may go
"""
