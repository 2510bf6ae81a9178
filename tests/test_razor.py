"""RazorAttention's echo and induction scores against the eager maps of the same input."""

import pytest
import torch
from bounds import U, logit_error, probability_tolerance
from conftest import eager_recorder, tiny_llama

from headlab.probes.scorers.razor import offsets_and_rows, razor_input, razor_scores

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units


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
    with eager_recorder(model) as records, torch.no_grad():
        model(input_ids=ids)
    for layer, (q, k, scaling, _, weights) in records.items():
        a = weights[0].double()  # [heads, N, N]
        # each cell within the two implementations' probability bound; the fp32 sum over the cells
        # adds at most (cells) · u · (its terms' sum, at most one per row)
        cell = probability_tolerance(logit_error(q, k, scaling), n)
        for name, mask in (("echo", echo), ("razor_induction", induction)):
            expected = (a * mask).sum((-1, -2)) / n**2
            cells = int(mask.sum())
            tolerance = (cells * cell + cells * U * n) / n**2
            assert (scores[name][layer].double() - expected).abs().max() <= tolerance, (name, layer)
    assert scores["razor_induction"].max() > 0 and scores["echo"].max() > 0
