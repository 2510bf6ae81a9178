"""Run inside the SAELens environment (.venv-saelens) by test_saelens_interop.py: load headlab's
autoencoders with SAELens, encode headlab's inputs, and attach them to a HookedSAETransformer built
from the same Llama weights. Writes ``results.json`` into the work folder.

    .venv-saelens/bin/python tests/saelens_worker.py WORK_DIR
"""

import importlib.metadata
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def hooked_model(folder: Path):
    """A HookedSAETransformer with the weights of the Llama in ``folder`` (no hub access)."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.head_dim, n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings,
        n_heads=c.num_attention_heads, n_key_value_heads=c.num_key_value_heads, d_mlp=c.intermediate_size,
        d_vocab=c.vocab_size, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=c.head_dim, rotary_base=c.rope_parameters["rope_theta"], final_rms=True, gated_mlp=True,
        eps=c.rms_norm_eps, original_architecture="LlamaForCausalLM", default_prepend_bos=False, dtype=torch.float32)
    model = HookedSAETransformer(cfg)
    model.load_state_dict(convert_llama_weights(hf, cfg), strict=False)
    return model.eval()


def main(work: Path) -> None:
    from sae_lens import SAE

    inputs = load_file(work / "inputs.safetensors")  # tokens [1, seq]; z [seq, d_in]: headlab's o_proj inputs
    model = hooked_model(work / "model")
    results = {"sae_lens": importlib.metadata.version("sae-lens"), "saes": {}}
    outputs = {}
    for folder in sorted(work.glob("sae-*")):
        sae = SAE.load_from_disk(folder, device="cpu")
        meta = sae.cfg.metadata
        hook = meta.hook_name
        n_heads = json.loads((folder / "cfg.json").read_text())["headlab"]["n_heads"]
        with torch.no_grad():
            z = inputs["z"]
            codes = sae.encode(z.view(z.shape[0], n_heads, -1))
            _, plain = model.run_with_cache(inputs["tokens"], names_filter=hook)
            model.add_sae(sae)
            _, cache = model.run_with_cache(inputs["tokens"])
            model.reset_saes()
        name = folder.name
        outputs[f"{name}/codes_on_z"] = codes.reshape(z.shape[0], -1)
        outputs[f"{name}/hook_z"] = plain[hook][0].reshape(z.shape[0], -1)
        outputs[f"{name}/pre_from_model"] = cache[f"{hook}.hook_sae_acts_pre"][0]
        outputs[f"{name}/codes_from_model"] = cache[f"{hook}.hook_sae_acts_post"][0]
        results["saes"][name] = {"class": type(sae).__name__, "architecture": sae.cfg.architecture(),
                                 "metadata": {key: meta[key] for key in ("sae_lens_version", "model_name", "hook_name",
                                                                         "context_size", "prepend_bos", "dataset_path",
                                                                         "neuronpedia_id")}}
    save_file({key: value.contiguous() for key, value in outputs.items()}, str(work / "outputs.safetensors"))
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
