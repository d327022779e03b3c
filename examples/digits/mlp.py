"""The digits classifier's architecture, as a factory for `model=torch_module`:

    sae-harvest model=torch_module model.factory=examples.digits.mlp:build model.weights=<out>/mlp.safetensors ...

(run from the repository root, or add model.factory_path=<repository root>). 64 pixels -> three ReLU hidden
layers of 64 -> 10 logits; module indices: Linear 0, ReLU 1 (h1), Linear 2, ReLU 3 (h2), Linear 4, ReLU 5, Linear 6.
"""

from __future__ import annotations

from torch import nn

HIDDEN = 64


def build(d_in: int = 64, hidden: int = HIDDEN, n_layers: int = 3, n_classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(n_layers):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    return nn.Sequential(*layers, nn.Linear(d, n_classes))
