"""Shared fixtures: tiny random models of odd sizes, and the bundled real models (loaded once)."""

import os
import random
import sys
from types import SimpleNamespace
from contextlib import contextmanager

import torch

if not torch.cuda.is_available():
    # Read when @triton.jit decorates, so it must be set before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 97

# name -> (query heads, kv heads): multi-head, grouped-query, multi-query; odd sizes on purpose.
LLAMA_VARIANTS = {"mha": (5, 5), "gqa": (9, 3), "mqa": (5, 1)}


def tiny_llama(kind: str = "gqa", seed: int = 0, layers: int = 3) -> LlamaForCausalLM:
    """A random Llama (3 layers by default) with head_dim 6 and the head layout of ``kind``."""
    heads, kv_heads = LLAMA_VARIANTS[kind]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=6 * heads,
        head_dim=6,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def perturb_feature_maps(model, seed: int):
    """Move every converted layer's feature maps off their identity start (seeded), in place; returns the model."""
    from headlab.surgeon.conversion.converted import converted_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in converted_layers(model).values():
            for fmap in (layer.feature_q, layer.feature_k):
                fmap.weight.add_(0.5 * torch.randn(fmap.weight.shape, generator=g))
    return model


def tiny_bert(seed: int = 0) -> BertModel:
    """A 3-layer random BERT encoder with 5 heads of size 7."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=35,
        num_hidden_layers=3,
        num_attention_heads=5,
        intermediate_size=41,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    return BertModel(config).eval()


def padded_batch(lengths, total: int, side: str, seed: int = 1):
    """``(input_ids, attention_mask)`` of ``len(lengths)`` rows padded to ``total`` on ``side``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), total), generator=gen)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, total - n :] = 1
        else:
            mask[row, :n] = 1
    return ids, mask


def eager_maps(model, **inputs):
    """Per-layer ``[batch, heads, query, key]`` maps from transformers' own eager path (the
    independent reference for every attention tap)."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")


class CharTokenizer:
    """Characters as token ids below the tiny vocabulary (``min(ord(c), VOCAB - 1)``, no special
    tokens): enough for reports, probes, needle prompts and text windows on tiny random models."""

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids = [min(ord(c), VOCAB - 1) for c in text]
        if return_offsets_mapping:
            return SimpleNamespace(input_ids=ids, offset_mapping=[(i, i + 1) for i in range(len(text))])
        return SimpleNamespace(input_ids=ids)

    def decode(self, ids, **kwargs):
        return "".join(chr(i) for i in ids)

    def build_inputs_with_special_tokens(self, ids):
        return list(ids)


@contextmanager
def eager_recorder(model):
    """Switch ``model`` to eager attention and record, per layer, what the family's own
    ``eager_attention_forward`` received and returned: ``{layer: (q, k, scaling, kwargs, weights)}``."""
    from headlab.surgeon.sites import attention_modules

    module = sys.modules[type(attention_modules(model)[0]).__module__]
    original = module.eager_attention_forward
    records = {}

    def recorder(attn, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out, weights = original(attn, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        records[attn.layer_idx] = (query.detach(), key.detach(), scaling, kwargs, weights.detach())
        return out, weights

    previous = model.config._attn_implementation
    module.eager_attention_forward = recorder
    model.set_attn_implementation("eager")
    try:
        yield records
    finally:
        module.eager_attention_forward = original
        model.set_attn_implementation(previous)


@pytest.fixture(autouse=True)
def seeded_random_state():
    """Every test starts from the same random state, so what it draws does not depend on which tests
    ran before it (alone, in the quick loop, or in the whole suite)."""
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(params=sorted(LLAMA_VARIANTS))
def llama(request):
    return tiny_llama(request.param)


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture(scope="session")
def smollm2():
    from headlab.surgeon import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    from headlab.surgeon import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def minilm():
    from headlab.surgeon import load_model

    return load_model("minilm-l6")


def frozen_state(session, kind: str, layer: int):
    """What the ``kind`` edit on ``layer`` fixed at the session's prefill (its entry in the request state)."""
    found = [value for (edit_kind, edit_layer, _), value in session.state.frozen.items()
             if edit_kind == kind and edit_layer == layer]
    assert len(found) == 1, f"{len(found)} {kind} edits on layer {layer} fixed state"
    return found[0]
