"""Model loading: local directories, bundled models, and clear errors for everything else."""

import pytest
import torch
from conftest import padded_batch, tiny_llama
from transformers import BloomConfig, BloomForCausalLM

from headlab.surgeon import (
    BUNDLED,
    ModelSpecError,
    UnsupportedModelError,
    bundled_status,
    load_model,
    model_shape,
)


@pytest.fixture
def llama_dir(tmp_path, smollm2):
    """A tiny Llama saved as an HF directory, with the SmolLM2 tokenizer beside it."""
    model = tiny_llama("gqa")
    model.save_pretrained(tmp_path)
    smollm2[1].save_pretrained(tmp_path)
    return tmp_path, model


@pytest.mark.real_model
def test_local_directory_loads_with_identical_logits(llama_dir):
    path, original = llama_dir
    model, tokenizer = load_model(path)
    assert model.config._attn_implementation == "sdpa" and not model.training
    ids, mask = padded_batch([6, 4], 6, "left")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           original(input_ids=ids, attention_mask=mask).logits)
    assert tokenizer("hello").input_ids


def test_unknown_spec_names_the_bundled_alternatives():
    with pytest.raises(ModelSpecError) as err:
        load_model("no-such-org/no-such-model")
    for name in BUNDLED:
        assert name in str(err.value)


def test_directory_without_config_and_plain_files_are_refused(tmp_path):
    with pytest.raises(ModelSpecError, match="without config.json"):
        load_model(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelSpecError, match="is a file"):
        load_model(weights)


def test_architecture_that_bypasses_the_attention_interface_is_refused(tmp_path):
    config = BloomConfig(vocab_size=50, hidden_size=24, n_layer=2, n_head=3)
    BloomForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="AttentionInterface.*Llama"):
        load_model(tmp_path)


def test_bundled_status_lists_geometry_and_installation():
    rows = {r["name"]: r for r in bundled_status()}
    assert set(rows) == {"smollm2-135m", "gemma3-270m", "minilm-l6"}
    assert (rows["smollm2-135m"]["layers"], rows["smollm2-135m"]["heads"], rows["smollm2-135m"]["kv_heads"]) == (30, 9, 3)
    assert (rows["gemma3-270m"]["layers"], rows["gemma3-270m"]["heads"], rows["gemma3-270m"]["kv_heads"]) == (18, 4, 1)
    assert (rows["minilm-l6"]["layers"], rows["minilm-l6"]["heads"]) == (6, 12)
    assert all(isinstance(r["installed"], bool) for r in rows.values())
    assert rows["gemma3-270m"]["licence"].endswith("GEMMA_TERMS.html")


@pytest.mark.real_model
def test_bundled_models_match_their_declared_geometry(smollm2, gemma3, minilm):
    for (model, _), name in ((smollm2, "smollm2-135m"), (gemma3, "gemma3-270m"), (minilm, "minilm-l6")):
        shape, declared = model_shape(model), BUNDLED[name]
        assert (shape.n_layers, shape.n_heads, shape.n_kv_heads) == (
            declared.n_layers, declared.n_heads, declared.n_kv_heads)
