"""DuoAttention's gate mixing and training on tiny models: gates at 1 are the model, gates at 0 the
streaming plan, the gradient reaches the gates, a killed training resumes to the same gates, and the
command writes a scores file and a plan."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import CharTokenizer, tiny_llama
from families import family_model
from transformers import LlamaConfig, LlamaForCausalLM

from headlab.cli import main
from headlab.surgeon.streaming.gates import GATE_SCORE, GateTraining, final_hidden, passkey_sample, sample_lengths
from headlab.core.head_scores import load_scores_file
from headlab.surgeon.streaming.settings import GateSettings
from headlab.surgeon import Plan, Stream, attach, model_shape
from headlab.core.errors import PlanError
from headlab.surgeon.streaming.mixing import StreamMix

SINKS, WINDOW = 2, 4


def _ids(n=19):
    return torch.randint(3, 97, (2, n), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt_oss"])  # MQA, MHA, learned sinks on a global layer
def test_gates_at_one_are_the_model_and_at_zero_the_streaming_plan(family):
    model = family_model(family)
    shape = model_shape(model)
    layer = 3  # a global layer in every family here
    ids = _ids()
    with torch.no_grad():
        own = model(input_ids=ids).logits
        ones = torch.ones(shape.n_layers, shape.n_kv_heads)
        with attach(model, mixing=StreamMix(ones, (layer,), SINKS, WINDOW)):
            assert torch.equal(model(input_ids=ids).logits, own)
        zeros = ones.clone()
        zeros[layer] = 0
        with attach(model, mixing=StreamMix(zeros, (layer,), SINKS, WINDOW)):
            mixed = model(input_ids=ids).logits
        with attach(model, Plan([Stream(layer, tuple(range(shape.n_heads)), sinks=SINKS, window=WINDOW)])):
            streamed = model(input_ids=ids).logits
    assert (mixed - own).abs().max() > 1e-3
    # the plan computes its heads in eager fp32, the mixing with the model's own attention: compare at
    # the scale of the model's own eager-vs-default difference
    eager = _eager_logits(model, ids)
    noise = float((eager - own).abs().max())
    assert (mixed - streamed).abs().max() <= 10 * noise + 1e-5


def _eager_logits(model, ids):
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        model.set_attn_implementation(previous)


def test_the_gradient_reaches_the_gates_of_the_mixed_layers_only():
    model = tiny_llama("gqa", layers=3)
    shape = model_shape(model)
    alphas = torch.full((shape.n_layers, shape.n_kv_heads), 0.5, requires_grad=True)
    with attach(model, mixing=StreamMix(alphas, (1, 2), SINKS, WINDOW)):
        final_hidden(model, _ids(16)).pow(2).sum().backward()
    assert alphas.grad[1:].abs().min() > 0 and torch.equal(alphas.grad[0], torch.zeros(shape.n_kv_heads))


def test_mixing_refuses_cached_decoding():
    model = tiny_llama("gqa", layers=3)
    ones = torch.ones(3, 3)
    with attach(model, mixing=StreamMix(ones, (1,), SINKS, WINDOW)), torch.no_grad():
        out = model(input_ids=_ids(8)[:1], use_cache=True)
        with pytest.raises(PlanError, match="whole sequences"):
            model(input_ids=_ids(8)[:1, :1], past_key_values=out.past_key_values, use_cache=True)


SMALL = dict(steps=6, min_length=256, max_length=256, intervals=1, passkeys=2, passkey_words=4, sinks=2, window=8,
             save_every=2, lr=0.05)


class OrdTokenizer:
    """Characters as their code points: the sample's text can be read back."""

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[ord(c) for c in text])


def test_a_sample_holds_its_passkeys_and_answers_them_at_the_end():
    tokenizer = OrdTokenizer()
    settings = GateSettings(**SMALL)
    haystack = tokenizer("lorem ipsum " * 200, add_special_tokens=False).input_ids
    sample = passkey_sample(tokenizer, haystack, ["alpha", "beta", "gamma"], settings, 3, [256])
    text = "".join(chr(i) for i in sample.input_ids[0].tolist())
    assert sample.input_ids.shape == (1, 256) and text.count("Passkey 1:") == 2 and text.count("Passkey 2:") == 2
    answer = text[text.index("Answer:") + len("Answer:"):]
    assert sample.targets.tolist() == list(range(255 - len(answer), 255))
    assert passkey_sample(tokenizer, haystack, ["alpha", "beta"], settings, 3, [256]).input_ids.shape == (1, 256)
    assert sample_lengths(GateSettings(min_length=1000, max_length=32000, intervals=50), 8192)[-1] == 8192


class Killed(Exception):
    """Stands for the process being killed during a step."""


def test_a_killed_gate_training_resumes_to_the_same_gates(tmp_path, monkeypatch):
    model, tokenizer = tiny_llama("gqa", layers=3), CharTokenizer()
    settings = GateSettings(**SMALL)
    complete = GateTraining(model, tokenizer, settings, tmp_path / "whole").run(progress=False)
    (tmp_path / "run").mkdir()
    training = GateTraining(model, tokenizer, settings, tmp_path / "run")
    real = GateTraining._update
    calls = []

    def dying(self):
        calls.append(self.step)
        if len(calls) == 4:
            raise Killed  # during the fourth step: the state saved after step 2 survives
        return real(self)

    monkeypatch.setattr(GateTraining, "_update", dying)
    with pytest.raises(Killed):
        training.run(progress=False)
    monkeypatch.setattr(GateTraining, "_update", real)
    resumed = GateTraining(model, tokenizer, settings, tmp_path / "run")
    assert resumed.step == 2
    assert torch.equal(resumed.run(progress=False), complete)
    assert not torch.equal(complete, torch.ones_like(complete)), "the gates must move"
    with pytest.raises(Exception, match="other settings"):
        GateTraining(model, tokenizer, GateSettings(**{**SMALL, "lam": 0.1}), tmp_path / "run")


def test_long_samples_recompute_each_block_in_the_backward_pass_and_train_the_same_gates(monkeypatch):
    import headlab.surgeon.streaming.gates as duo

    model, tokenizer = tiny_llama("gqa", layers=3), CharTokenizer()
    plain = GateTraining(model, tokenizer, GateSettings(**SMALL)).run(progress=False)
    calls = []
    for index, layer in enumerate(model.model.layers):  # counted in the forward itself: a recompute runs no hooks
        layer.mlp.forward = lambda *args, own=layer.mlp.forward, index=index: (calls.append(index), own(*args))[1]
    monkeypatch.setattr(duo, "needs_recompute", lambda model, n_tokens: True)  # as for a long sample
    recomputed = GateTraining(model, tokenizer, GateSettings(**SMALL)).run(progress=False)
    # per step: the teacher's forward, the student's, and the student's again in the backward pass
    assert len(calls) == 3 * 3 * SMALL["steps"]
    assert torch.equal(recomputed, plain) and not torch.equal(plain, torch.ones_like(plain))


def test_a_finished_gate_training_extends_to_the_gates_of_a_longer_run(tmp_path):
    model, tokenizer = tiny_llama("gqa", layers=3), CharTokenizer()
    longer = GateSettings(**{**SMALL, "steps": SMALL["steps"] + 2})
    straight = GateTraining(model, tokenizer, longer, tmp_path / "straight").run(progress=False)
    GateTraining(model, tokenizer, GateSettings(**SMALL), tmp_path / "run").run(progress=False)
    extended = GateTraining(model, tokenizer, longer, tmp_path / "run")
    assert extended.step == SMALL["steps"]
    assert torch.equal(extended.run(progress=False), straight)
    with pytest.raises(Exception, match="more than --steps"):
        GateTraining(model, tokenizer, GateSettings(**{**SMALL, "steps": 1}), tmp_path / "run")


@pytest.mark.real_model
def test_train_gates_command_writes_a_scores_file_and_a_plan(tmp_path, smollm2):
    tokenizer = smollm2[1]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=54, head_dim=6, intermediate_size=37,
                         num_hidden_layers=3, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    status = main(["train-gates", str(tmp_path / "model"), "--steps", "3", "--min-length", "256", "--max-length",
                   "256", "--intervals", "1", "--passkeys", "2", "--passkey-words", "4", "--sinks", "2", "--window",
                   "8", "--out", str(tmp_path / "gates")])
    assert status == 0
    scores = load_scores_file(tmp_path / "gates" / "gates.json", model_shape(model))
    gates = scores[GATE_SCORE].values
    assert gates.shape == (3, 9) and ((gates >= 0) & (gates <= 1)).all()
    plan = Plan.load(tmp_path / "gates" / "plan.json")
    kept = {(layer, h // 3) for layer in range(3) for h in range(9) if gates[layer, h] >= 0.5}
    streamed = {(e.layer, h // 3) for e in plan.edits for h in e.heads}
    assert kept.isdisjoint(streamed) and len(kept) + len(streamed) == 9
    assert json.loads((tmp_path / "gates" / "gates.json").read_text())["provenance"]["steps"] == 3
