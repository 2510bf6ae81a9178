"""RazorAttention's echo and induction scores against the eager maps of the same input."""

import pytest
import torch
from conftest import eager_maps, tiny_llama

from headlab.probes.razor import offsets_and_rows, razor_input, razor_scores


def test_offsets_mark_only_earlier_occurrences():
    echo, induction, valid = offsets_and_rows(period=4, repeats=3)  # N = 13: first token, then 3 x 4 ids
    assert echo == (4, 8) and induction == (3, 7)
    assert valid[:5].sum() == 0  # the first token and the first repeat have no earlier occurrence
    assert valid[5:9].tolist() == [[True, False]] * 4 and valid[9:].tolist() == [[True, True]] * 4


@pytest.mark.parametrize("kind", ["gqa", "mqa"])
def test_scores_equal_the_masked_sum_of_eager_maps(kind):
    model = tiny_llama(kind)
    model.config.bos_token_id = 1
    period, repeats = 7, 3
    ids = razor_input(model, period, repeats, seed=2)
    assert ids[0, 0] == 1 and torch.equal(ids[0, 1:period + 1], ids[0, 1 + 2 * period:])
    scores = razor_scores(model, period, repeats, seed=2, progress=False)
    n = ids.shape[1]
    echo = torch.zeros(n, n, dtype=torch.bool)
    for i in range(1 + period, n):
        for j in range(1, i):
            echo[i, j] = (i - j) % period == 0
    induction = torch.zeros_like(echo)
    induction[:, 1:] = echo[:, :-1]  # the key after each echo key
    maps = eager_maps(model, input_ids=ids)
    for layer, layer_map in enumerate(maps):
        a = layer_map[0].double()  # [heads, N, N]
        expected_echo = (a * echo).sum((-1, -2)) / n**2
        expected_induction = (a * induction).sum((-1, -2)) / n**2
        # fp32 weights (each within ~1e-6 relative of the map's) summed over < N² cells, divided by N²
        torch.testing.assert_close(scores["echo"][layer].double(), expected_echo, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(scores["razor_induction"][layer].double(), expected_induction, rtol=1e-5, atol=1e-9)
    assert scores["razor_induction"].max() > 0 and scores["echo"].max() > 0
