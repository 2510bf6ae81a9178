"""Chat training data of the conversion: questions with hidden facts, batched answers equal to one
prompt at a time, packing, reuse of the written conversations, and the clear error without a
chat template."""

import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headlab.core.text import TextWindows
from headlab.surgeon.conversion import data as conversion_data
from headlab.surgeon.conversion.data import chat_windows, conversation_ids, pack, require_chat_template
from headlab.surgeon.conversion.settings import ConversionSettings
from headlab.core.errors import HeadlabError


def test_retrieval_questions_hide_their_fact_in_the_passage():
    ids = list(range(1000, 1400))

    class Words:
        def decode(self, chunk):
            return " ".join(f"Word{i}." for i in chunk)

    rng = random.Random(0)
    kinds = set()
    for _ in range(40):
        item = conversion_data._question(Words(), ids, rng, 64, 200)
        kinds.add(item["kind"])
        if item["kind"] == "retrieval":
            fact = item["prompt"].split("\n\nBased on")[0]
            assert f" is {item['answer']}. " in fact + " "
            name = item["prompt"].rsplit(" of ", 1)[1].split("?")[0]
            assert f"of {name} is {item['answer']}" in fact
    assert kinds == {"retrieval", "summary"}


@pytest.mark.real_model
def test_batched_answers_equal_one_prompt_at_a_time(smollm2):
    """Left-padded batch generation answers each prompt as generating it alone does (a tiny random
    model with SmolLM2's tokenizer and chat template)."""
    _, tokenizer = smollm2
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    prompts = ["Short question?", "A much longer passage of text that pads the other prompt.\n\nWhat is it about?"]
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    batched = conversion_data._answers(model, tokenizer, prompts)
    alone = [conversion_data._answers(model, tokenizer, [p])[0] for p in prompts]
    assert batched == alone and all(batched)
    assert (tokenizer.padding_side, tokenizer.pad_token) == (side, pad), "the tokenizer is left as it was"


@pytest.mark.real_model
def test_chat_windows_pack_the_conversations_and_reuse_the_written_file(smollm2, tmp_path, monkeypatch):
    _, tokenizer = smollm2
    calls = []

    def answers(model, tok, prompts):
        calls.append(len(prompts))
        return [f"answer {len(p)}" for p in prompts]

    monkeypatch.setattr(conversion_data, "_answers", answers)
    settings = ConversionSettings(text=TextWindows(tokens=128, windows=2), data="chat")
    train, held_out = chat_windows(None, tokenizer, settings, 5, tmp_path, progress=False)
    assert [w.shape for w in train] == [(1, 128)] * 5 and len(held_out) == 2
    data = json.loads((tmp_path / "chat_data.json").read_text())
    stream = sum((conversation_ids(tokenizer, c) for c in data["train"]), [])
    assert torch.equal(torch.cat(train, 1)[0], torch.tensor(stream[:5 * 128]))
    assert tokenizer.decode(stream[:40]).startswith("<|im_start|>")
    assert all(c["response"] == f"answer {len(c['prompt'])}" for c in data["train"])
    made = len(calls)
    again, _ = chat_windows(None, tokenizer, settings, 5, tmp_path, progress=False)
    assert len(calls) == made and all(torch.equal(a, b) for a, b in zip(again, train))
    from headlab.core.text import load_text

    for split, source, other in (("train", load_text(None), load_text(None, heldout=True)),
                                 ("held_out", load_text(None, heldout=True), load_text(None))):
        snippets = [c["prompt"].rsplit("\n\n", 1)[0][5:85] for c in data[split] if c["kind"] == "summary"]
        assert snippets and all(snippet in source for snippet in snippets)  # the passage, then the question
        assert sum(snippet in other for snippet in snippets) <= len(snippets) // 10  # shared boilerplate at most
    with pytest.raises(HeadlabError, match="fewer than"):
        pack(tokenizer, data["held_out"][:1], 128, 50)


def test_a_tokenizer_without_a_chat_template_is_refused_in_one_line():
    class Plain:
        chat_template = None

    with pytest.raises(HeadlabError, match="no chat template.*--data text"):
        require_chat_template(Plain(), "gemma3-270m")
