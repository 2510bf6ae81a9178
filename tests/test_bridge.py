"""Plans and taps on a TransformerLens TransformerBridge around the same HF model.

The bridge re-implements attention in its own code (forced eager) and never calls transformers'
attention interface; ``attach_bridge`` applies the same session through the bridge's hook points.
Booting a bridge rewires the HF model it wraps in place, so comparisons use a second HF model
with the same weights.
"""

import pytest
import torch
from conftest import tiny_llama

from headlab.surgeon import Calibrate, HeadScale, Plan, PlanError, Taps, attach, attach_bridge

pytestmark = pytest.mark.real_model  # borrows the SmolLM2 tokenizer


@pytest.fixture
def bridge_and_model(tmp_path, smollm2):
    from transformer_lens.model_bridge import TransformerBridge

    model = tiny_llama("gqa")
    model.save_pretrained(tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), hf_model=model, device="cpu", tokenizer=smollm2[1])
    return bridge, model


def test_registered_function_is_not_called_inside_the_bridge(bridge_and_model):
    import headlab.surgeon.hook as hook

    bridge, model = bridge_and_model
    calls = []
    original = hook.Session.attend
    hook.Session.attend = lambda self, module, *a: calls.append(module.layer_idx) or original(self, module, *a)
    try:
        with torch.no_grad(), attach(model):
            bridge(torch.tensor([[5, 6, 7, 8]]))
    finally:
        hook.Session.attend = original
    assert calls == []


def test_bridge_session_matches_the_hf_hook(bridge_and_model):
    bridge, _ = bridge_and_model
    model = tiny_llama("gqa")  # same seed, same weights, not rewired by the bridge
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    plan = Plan([HeadScale(0, (2, 7), 0.0), HeadScale(2, (5,), 3.0)])
    taps = Taps(attention={1: [0, 4, 8]}, head_outputs=[2])
    with torch.no_grad(), attach_bridge(bridge, plan, taps) as on_bridge:
        bridge_logits = bridge(ids)
    model.set_attn_implementation("eager")
    with torch.no_grad(), attach(model, plan, taps) as on_hf:
        hf_logits = model(input_ids=ids).logits
    with torch.no_grad():
        unedited = model(input_ids=ids).logits
    assert torch.allclose(bridge_logits, hf_logits, atol=1e-5)
    assert not torch.allclose(bridge_logits, unedited, atol=1e-3)
    assert torch.allclose(on_bridge.recording.attention_map(1), on_hf.recording.attention_map(1), atol=1e-6)
    assert torch.allclose(on_bridge.recording.head_output(2), on_hf.recording.head_output(2), atol=1e-5)


def test_softmax_edits_are_refused_on_the_bridge(bridge_and_model):
    bridge, _ = bridge_and_model
    with pytest.raises(PlanError, match="calibrate needs the softmax"):
        with attach_bridge(bridge, Plan([Calibrate(2, (1,))])):
            pass
