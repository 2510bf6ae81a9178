"""Check that SAELens loads a headlab autoencoder folder and computes the same codes and
reconstructions. SAELens 6.x pins transformer-lens 3.x while headlab needs 4.3, so the check runs
in two environments:

    python examples/saelens_interop.py reference SAE_DIR ref.safetensors   # headlab's venv
    python examples/saelens_interop.py check SAE_DIR ref.safetensors out.json  # a venv with sae-lens
"""

from __future__ import annotations

import importlib.metadata
import json
import sys

import torch
from safetensors.torch import load_file, save_file


def reference(folder: str, target: str) -> None:
    """headlab's codes and reconstructions of random head outputs, saved for the check."""
    from headlab.sae import load_sae

    sae, _ = load_sae(folder)
    x = torch.randn(64, sae.d_in, generator=torch.Generator().manual_seed(0)) * 0.5
    save_file({"x": x, "codes": sae.encode(x), "x_hat": sae.reconstruct(x)}, target)


def check(folder: str, source: str, out: str) -> None:
    """Load ``folder`` with SAELens (``reshape_activations: hook_z`` takes ``[..., heads, d_head]``)."""
    from sae_lens import SAE

    ref = load_file(source)
    sae = SAE.load_from_disk(folder, device="cpu")
    n_heads = json.load(open(f"{folder}/cfg.json"))["headlab"]["n_heads"]
    codes = sae.encode(ref["x"].view(ref["x"].shape[0], n_heads, -1))
    x_hat = sae.decode(codes).reshape(ref["x"].shape[0], -1)
    result = {"sae_lens": importlib.metadata.version("sae-lens"), "class": type(sae).__name__,
              "codes_max_abs_difference": (codes - ref["codes"]).abs().max().item(),
              "reconstruction_max_abs_difference": (x_hat - ref["x_hat"]).abs().max().item(),
              "same_active_latents": bool(torch.equal(codes > 0, ref["codes"] > 0))}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(result)


if __name__ == "__main__":
    {"reference": reference, "check": check}[sys.argv[1]](*sys.argv[2:])
