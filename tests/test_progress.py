"""What long work says while it runs: block-by-block status inside one forward and backward (the same
numbers as without it), bars and status lines with ``progress`` and nothing without."""

from types import SimpleNamespace

import torch
from conftest import VOCAB, tiny_llama
from sae_worker import Chunks

from headlab.sae.activations import ShuffleBuffer
from headlab.surgeon.search import calibration as search
from headlab.surgeon.search.tasks import load_task
from headlab.surgeon.sites import announcing_layers, decoder_layers


class CharTokenizer:
    """Characters as token ids (mod the tiny vocabulary), with a BOS-like id 1."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        ids = [2 + ord(c) % (VOCAB - 2) for c in text]
        return SimpleNamespace(input_ids=([1] if add_special_tokens else []) + ids)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_announcing_layers_tells_each_block_forward_and_backward_and_changes_nothing():
    model = tiny_llama("gqa", layers=3)
    ids = torch.randint(2, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(model, ids)
    heard = []
    with announcing_layers(model, heard.append, "prefill", backward="back"):
        announced_loss = model(input_ids=ids, labels=ids).loss
    model.zero_grad(set_to_none=True)
    announced_loss.backward()  # the backward's hooks sit on the outputs of the forward run inside
    assert heard == ["prefill", "prefill, layer 1 of 3", "prefill, layer 2 of 3", "prefill, layer 3 of 3",
                     "back, layer 3 of 3", "back, layer 2 of 3", "back, layer 1 of 3"]
    assert torch.equal(announced_loss.detach(), loss)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    blocks = decoder_layers(model).values()
    assert not any(block._forward_pre_hooks or block._forward_hooks for block in blocks), "hooks removed on exit"
    heard.clear()
    model(input_ids=ids)
    with announcing_layers(model, None, "nothing"):
        model(input_ids=ids)
    assert heard == []


def test_a_shuffle_buffer_shows_its_refills_only_with_progress(capsys):
    for progress in (False, True):
        buffer = ShuffleBuffer(Chunks(0), 8, 32, seed=3, progress=progress)
        for _ in range(6):  # the first fill (one chunk of 40 rows), then a refill once under half is left
            buffer.next_batch()
        err = capsys.readouterr().err
        assert (("gathering activations" in err and "refilling activations" in err) if progress else err == "")


def test_the_calibration_search_says_what_runs_only_with_progress(tmp_path, capsys):
    model, tok = tiny_llama("gqa", layers=4), CharTokenizer()
    examples = load_task("arithmetic", "calibration", 6)
    settings = search.SearchSettings(("arithmetic",), len(examples), tuple(search.default_candidates(model, [2])))
    quiet = search.calibration_search(model, tok, examples, settings, tmp_path / "quiet.json", 4, progress=False)
    assert capsys.readouterr().err == ""
    shown = search.calibration_search(model, tok, examples, settings, tmp_path / "shown.json", 4)
    err = capsys.readouterr().err
    assert shown == quiet
    assert "calibration search: unedited pass over 6 examples" in err and "unedited pass" in err
    assert "layer 2, 9 heads: choices, forward 1 of" in err and "layer 4 of 4" in err
