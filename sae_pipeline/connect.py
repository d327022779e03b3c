"""sae-connect: the seed's feature connector between two SAEs on consecutive hook points (seeds/002).

    sae-connect sae_in=runs/train/<run on hook a> sae_out=runs/train/<run on hook b>
    sae-connect sae_in=... sae_out=... connect.init=e2wd1 connect.layer_weights=layer.safetensors

Both SAEs' stores must come from one harvest (`hook.names=[a, b]`): their rows are matched by (context id,
position), encoded by each SAE (F1, F2), and F2 ~ ReLU(F1 @ W_IO + b_O) is fitted with an L1 penalty on W_IO
(interpret/connectors.py). Writes into connect.out (default <paths.root>/connect/<in>__<out>/):
connector.safetensors (W_IO, b_O), metrics.json (train and held-out MSE, FVU of F2, density of W),
config.json, W2.png and connections.txt (the sparsest strong connections as `OF_i = 0.26 IF_j + ...`).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sae_pipeline import layout, locks
from sae_pipeline.data.aligned import aligned_rows
from sae_pipeline.errors import UserError, report_config_errors, report_user_errors
from sae_pipeline.files import save_tensors_atomic, write_json_atomic, write_text_atomic
from sae_pipeline.interpret.connector_run import encode, layer_fvus, layer_init, sae_and_store
from sae_pipeline.interpret.connectors import (
    ConnectorConfig,
    connector_metrics,
    format_connections,
    plot_connector,
    train_connector,
)
from sae_pipeline.runtime import resolve_device
from sae_pipeline.schema import register_configs
from sae_pipeline.schema.connect import check_connect_config


def run(cfg: DictConfig) -> Path:
    """Train the connector between cfg.sae_in and cfg.sae_out; returns the output folder."""
    check_connect_config(cfg)
    c = cfg.connect
    t_in, sae_in, store_in = sae_and_store(cfg.sae_in, "sae_in")
    t_out, sae_out, store_out = sae_and_store(cfg.sae_out, "sae_out")
    out = Path(c.out) if c.out else Path(cfg.paths.root) / layout.CONNECT / f"{t_in.name}__{t_out.name}"
    if (out / layout.CONNECTOR_WEIGHTS).exists() and not c.overwrite:
        raise UserError(
            f"connect.out={out} already holds {layout.CONNECTOR_WEIGHTS}; pass connect.overwrite=true to replace it."
        )
    x1_ND, x2_ND = aligned_rows(store_in, store_out, c.n_rows)
    for key, sae, x in (("sae_in", sae_in, x1_ND), ("sae_out", sae_out, x2_ND)):
        if sae.d_in != x.shape[1]:
            raise UserError(
                f"the SAE {key}={cfg[key]} has d_in={sae.d_in} but its store rows have {x.shape[1]}."
            )
    device = resolve_device(c.device)
    f1_NI, f2_NO = encode(sae_in, x1_ND, device), encode(sae_out, x2_ND, device)
    n_val = max(1, int(round(c.val_fraction * len(f1_NI))))
    if len(f1_NI) - n_val < 1:
        raise UserError(
            f"only {len(f1_NI)} matched rows: too few to hold out connect.val_fraction={c.val_fraction}."
        )
    perm = torch.randperm(len(f1_NI), generator=torch.Generator().manual_seed(c.seed))
    val, tr = perm[:n_val].to(device), perm[n_val:].to(device)
    ccfg = ConnectorConfig(**{f.name: c[f.name] for f in fields(ConnectorConfig)})
    init = layer_init(c.layer_weights, sae_in.cpu(), sae_out.cpu()) if c.init == "e2wd1" else None
    conn, train_metrics = train_connector(
        f1_NI[tr], f2_NO[tr], ccfg, init=init, log=lambda s, p: print(f"step {s}: {p}", flush=True)
    )
    val_metrics = connector_metrics(conn, f1_NI[val], f2_NO[val], ccfg.prune_fraction)
    val_metrics.update(
        layer_fvus(conn, sae_out.to(device), f1_NI[val], f2_NO[val], x2_ND[val.cpu()].to(device))
    )
    alive_O = (f2_NO > 0).any(0)
    lines = format_connections(conn.W_IO, n_outputs=20, alive_O=alive_O)
    with locks.hold(out, "the connector folder", "rerun it when that one has ended"):
        save_tensors_atomic(
            out / layout.CONNECTOR_WEIGHTS, {"W_IO": conn.W_IO.detach().cpu(), "b_O": conn.b_O.detach().cpu()}
        )
        metrics = {
            "train": {k: v for k, v in train_metrics.items() if k != "config"},
            "val": val_metrics,
            "n_rows": {"train": len(tr), "val": n_val},
            "alive_outputs": int(alive_O.sum()),
        }
        write_json_atomic(out / layout.METRICS, metrics)
        write_json_atomic(
            out / layout.CONFIG,
            {
                "sae_in": str(t_in.sae_dir),
                "sae_out": str(t_out.sae_dir),
                "store_in": str(store_in),
                "store_out": str(store_out),
                "connect": OmegaConf.to_container(c, resolve=True),
            },
        )
        write_text_atomic(out / layout.CONNECTIONS, "\n".join(lines) + "\n")
        plot_connector(conn.W_IO, out / layout.CONNECTOR_PLOT, title=f"W2: {t_in.name} -> {t_out.name}")
    print(
        f"wrote {out}: held-out FVU of F2 {val_metrics['fvu']:.3f}, of the later hook's activations "
        f"{val_metrics['fvu_out_activations']:.3f} (its SAE alone {val_metrics['fvu_out_sae_alone']:.3f}), "
        f"{val_metrics['inputs_per_output']:.1f} strong inputs per output"
    )
    for line in lines[:5]:
        print("  " + line)
    return out


register_configs()


@report_config_errors  # outside hydra.main: an override it cannot compose is one line too
@hydra.main(version_base="1.3", config_path="conf", config_name="connect")
@report_user_errors  # inside hydra.main, so a UserError is one line instead of Hydra's traceback
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
