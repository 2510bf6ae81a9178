"""SAELens reads what headlab saves: in SAELens' own environment (``.venv-saelens``, built by
``scripts/setup.sh --tests``; SAELens pins transformer-lens < 4), every architecture loads with its
metadata intact (a 6.x config, not one rebuilt from top-level keys), encodes headlab's inputs to
headlab's codes, and, attached with ``HookedSAETransformer.add_sae`` to a HookedTransformer built
from the same Llama weights, reproduces headlab's codes from the model's own ``hook_z``.

Tolerances: the pre-activations of two fp32 implementations differ by at most the GEMM bound of
:func:`_gemm_bound`; through the model, by that plus the measured difference of the two models'
``hook_z`` carried through ``|W_enc|``. Codes must agree wherever the activation's decision (sign,
threshold, or the k-th/(k+1)-th gap) is farther than that from its boundary.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from bounds import U
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

from headlab.sae import SparseAutoencoder, head_outputs, initialise, load_sae, save_sae

ROOT = Path(__file__).resolve().parents[1]
SAELENS_PYTHON = ROOT / ".venv-saelens" / "bin" / "python"
LAYER, N_TOKENS = 1, 24

if not SAELENS_PYTHON.exists() and os.environ.get("HEADLAB_REQUIRE_SAELENS"):
    raise RuntimeError("HEADLAB_REQUIRE_SAELENS is set but .venv-saelens is missing (bash scripts/setup.sh --tests)")
pytestmark = [pytest.mark.skipif(not SAELENS_PYTHON.exists(), reason="no .venv-saelens (bash scripts/setup.sh --tests)"), pytest.mark.slow]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Save a tiny Llama, its inputs and one autoencoder per architecture; run the worker."""
    work = tmp_path_factory.mktemp("saelens")
    model = tiny_llama("gqa", layers=3)
    model.save_pretrained(work / "model")
    tokens = torch.randint(1, 90, (1, N_TOKENS), generator=torch.Generator().manual_seed(0))
    z = head_outputs(model, tokens, LAYER)  # [seq, 9 heads x 6]
    sample = torch.cat([head_outputs(model, torch.randint(1, 90, (1, 40)), LAYER) for _ in range(4)])
    for arch in ("topk", "batchtopk", "relu", "jumprelu"):
        sae = SparseAutoencoder(z.shape[1], 96, arch, 6, 9, 6, seed=3)
        initialise(sae, sample)
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
            if arch in ("batchtopk", "jumprelu"):
                sae.threshold.copy_(sae.pre_activations(sample * sae.scale).quantile(0.9, dim=0).clamp_min(1e-3))
        save_sae(sae.eval(), work / f"sae-{arch}", "org/tiny-llama", LAYER, "LlamaAttention o_proj input", N_TOKENS,
                 model_spec=str(work / "model"), dataset_path="text.txt")
    save_file({"tokens": tokens.contiguous(), "z": z.contiguous()}, str(work / "inputs.safetensors"))
    done = subprocess.run([str(SAELENS_PYTHON), str(ROOT / "tests" / "saelens_worker.py"), str(work)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return work, z, json.loads((work / "results.json").read_text()), load_file(work / "outputs.safetensors")


ARCHS = ("topk", "batchtopk", "relu", "jumprelu")


def _gemm_bound(x: torch.Tensor, sae) -> float:
    """Twice the fp32 error bound of ``(x - b_dec) W_enc + b_enc`` over ``d_in`` terms."""
    magnitude = ((x - sae.b_dec).abs() @ sae.W_enc.abs() + sae.b_enc.abs()).max().item()
    return 2 * (sae.d_in + 2) * U * magnitude


def _decided(pre: torch.Tensor, sae, margin: float) -> torch.Tensor:
    """``[seq, d_sae]`` bool: entries whose active/inactive decision is farther than ``margin``
    from its boundary (TopK: rows whose k-th and (k+1)-th pre-activations are that far apart)."""
    if sae.arch == "relu":
        return pre.abs() > margin
    if sae.arch in ("jumprelu", "batchtopk"):
        return (pre - sae.threshold).abs() > margin
    top = pre.topk(sae.k + 1, dim=1).values
    return ((top[:, -2] - top[:, -1]) > 2 * margin)[:, None].expand_as(pre)


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_reads_the_metadata_as_a_6x_config(run, arch):
    _, _, results, _ = run
    found = results["saes"][f"sae-{arch}"]
    assert found["architecture"] == {"relu": "standard", "topk": "topk"}.get(arch, "jumprelu")
    meta = found["metadata"]
    assert meta["sae_lens_version"].startswith("6.")
    assert (meta["model_name"], meta["hook_name"]) == ("org/tiny-llama", f"blocks.{LAYER}.attn.hook_z")
    assert (meta["context_size"], meta["prepend_bos"], meta["neuronpedia_id"]) == (N_TOKENS, False, None)
    assert meta["dataset_path"] == "text.txt"


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_encodes_headlabs_inputs_to_headlabs_codes(run, arch):
    work, z, _, outputs = run
    sae, _ = load_sae(work / f"sae-{arch}")
    with torch.no_grad():
        pre, codes = sae.pre_activations(z), sae.encode(z)
    bound = _gemm_bound(z, sae)
    theirs = outputs[f"sae-{arch}/codes_on_z"]
    decided = _decided(pre, sae, bound)
    assert decided.float().mean() > 0.95, "the check must decide most entries"
    assert torch.equal((theirs > 0)[decided], (codes > 0)[decided])
    assert (theirs - codes).abs()[decided].max() <= bound


@pytest.mark.parametrize("arch", ARCHS)
def test_add_sae_reproduces_headlabs_codes_from_the_models_hook_z(run, arch):
    work, z, _, outputs = run
    sae, _ = load_sae(work / f"sae-{arch}")
    hook_z = outputs[f"sae-{arch}/hook_z"]
    drift = (hook_z - z).abs().max().item()
    assert drift <= 1e-4 * z.abs().max().item(), "hook_z must be the o_proj input headlab encodes"
    with torch.no_grad():
        pre, codes = sae.pre_activations(z), sae.encode(z)
    bound = _gemm_bound(z, sae) + drift * sae.W_enc.abs().sum(0).max().item()
    assert (outputs[f"sae-{arch}/pre_from_model"] - pre).abs().max() <= bound
    decided = _decided(pre, sae, bound)
    theirs = outputs[f"sae-{arch}/codes_from_model"]
    assert decided.float().mean() > 0.95
    assert torch.equal((theirs > 0)[decided], (codes > 0)[decided])
    assert (theirs - codes).abs()[decided].max() <= bound
