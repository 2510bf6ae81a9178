"""The hook on a vision-language model: a tiny random LLaVA built from configs. Only the language
model is switched to headlab; the image span comes from the model's own image token id."""

import torch
from conftest import frozen_state
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from headlab.surgeon import Plan, Redistribute, Request, Steer, Taps, attach, attention_modules

IMAGE_TOKENS = 4  # 16x16 pixels in 8x8 patches, CLS dropped


def tiny_llava():
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    text = LlamaConfig(vocab_size=97, hidden_size=30, head_dim=6, intermediate_size=37, num_hidden_layers=5,
                       num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=96,
                                                      attn_implementation="sdpa")).eval()
    with torch.no_grad():  # a massive activation on the BOS-like token, for VAR's sink detection
        model.model.language_model.embed_tokens.weight[:, 3] = 0.0
        model.model.language_model.embed_tokens.weight[1, 3] = 300.0
    return model


def inputs(model):
    image = model.config.image_token_id
    ids = torch.tensor([[1, 5, 6, *[image] * IMAGE_TOKENS, 7, 8, 9, 10, 11]])
    return ids, torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_only_the_language_model_is_hooked_and_an_empty_plan_is_exact():
    model = tiny_llava()
    ids, pixels = inputs(model)
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=pixels).logits
    modules = attention_modules(model)
    assert len(modules) == 5 and all(m.config is model.config.text_config for m in modules)
    with torch.no_grad(), attach(model):
        assert model.config.text_config._attn_implementation == "headlab-sdpa"
        assert model.config.vision_config._attn_implementation == "sdpa"
        hooked = model(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(hooked, plain)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_var_and_steering_on_the_image_span():
    model = tiny_llava()
    ids, pixels = inputs(model)
    image_span = ids == model.config.image_token_id
    plan = Plan([Redistribute(2, tuple(range(5)), sink_dims=(3,), sink_threshold=5.0, span_mass_min=0.05,
                              sink_share_max=0.9),
                 Steer(1, (0, 2), alpha=0.1)])
    taps = Taps(attention={1: None, 2: None})
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=pixels).logits
        with attach(model, plan, taps, request=Request(span=image_span, emphasis=image_span)) as session:
            edited = model(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(frozen_state(session, "redistribute", 2), ids == 1)
    for layer in (1, 2):
        sums = session.recording.attention_map(layer).sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    steered = session.recording.attention_map(1)[0, 0]  # [query, key]
    assert steered[-1, image_span[0]].sum() > 0.5, "steering toward the image span must raise its mass"
    assert not torch.allclose(edited, plain, atol=1e-4)
