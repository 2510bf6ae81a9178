"""RazorAttention's echo and induction scores (Tang et al., 2024), without the N×N map.

The input is a first token (the model's BOS where it has one) followed by ``period`` random ids
repeated ``repeats`` times. For a query ``i`` in a repeat after the first, the **echo** keys are the
earlier occurrences of the same token (``j = i − m·period``, ``m ≥ 1``, never the first token) and the
**induction** keys the tokens after them (``j + 1``). A head's score is its attention on those keys
summed over every such query, divided by ``N²`` (the mean over all cells of the causal map, as
published). The weights come from the statistics tap's row offsets (``p[i, i − d]`` from each row's
log-sum-exp), so the published 10,001-token input needs no map.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ...core.errors import HeadlabError
from ...surgeon import Taps, attach, model_shape
from ...surgeon.stopping import run_for_taps

PERIOD, REPEATS = 2500, 4  # the published input: 2500 random ids, 4 times
ID_RANGE = (10000, 12500)  # where the random ids are drawn (clipped to the vocabulary)


def check_vocabulary(config, period: int = PERIOD) -> None:
    """Refuse, in one line, a model whose vocabulary cannot hold ``period`` distinct random ids."""
    vocab = config.get_text_config().vocab_size
    if vocab < period:
        raise HeadlabError(f"the razor scores draw {period} distinct random ids; this model's vocabulary holds "
                           f"{vocab}")


def razor_input(model, period: int = PERIOD, repeats: int = REPEATS, seed: int = 0) -> torch.Tensor:
    """``[1, 1 + period · repeats]``: the first token, then ``period`` ids drawn uniformly from
    :data:`ID_RANGE` (clipped to the vocabulary), repeated."""
    config = model.config.get_text_config()
    check_vocabulary(model.config, period)
    high = min(ID_RANGE[1], config.vocab_size)
    low = min(ID_RANGE[0], high - period)
    ids = torch.randint(low, high, (period,), generator=torch.Generator().manual_seed(seed))
    first = config.bos_token_id if config.bos_token_id is not None else int(ids[0])
    return torch.cat([torch.tensor([first]), ids.repeat(repeats)])[None]


def offsets_and_rows(period: int, repeats: int) -> tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]:
    """``(echo offsets, induction offsets, valid [N, repeats − 1])``: offset ``m·period`` (echo) and
    ``m·period − 1`` (induction) for ``m = 1 … repeats − 1``; ``valid[i, m − 1]`` where query ``i`` has
    an ``m``-th earlier occurrence (it lies in a repeat ``≥ m``)."""
    multiples = range(1, repeats)
    echo = tuple(m * period for m in multiples)
    induction = tuple(m * period - 1 for m in multiples)
    repeat_of = torch.div(torch.arange(1 + period * repeats) - 1, period, rounding_mode="floor")  # -1: first token
    valid = torch.stack([repeat_of >= m for m in multiples], dim=1)
    return echo, induction, valid


@torch.no_grad()
def razor_scores(model, period: int = PERIOD, repeats: int = REPEATS, seed: int = 0,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """``{"echo": [layer, head], "razor_induction": [layer, head]}`` on :func:`razor_input`."""
    if repeats < 2 or period < 2:
        raise ValueError(f"RazorAttention's input needs period ≥ 2 and repeats ≥ 2, got {period} and {repeats}")
    shape = model_shape(model)
    ids = razor_input(model, period, repeats, seed)
    echo, induction, valid = offsets_and_rows(period, repeats)
    n = ids.shape[1]
    scores = {"echo": [], "razor_induction": []}
    taps = Taps(stats={layer: None for layer in range(shape.n_layers)}, stats_row_offsets=echo + induction)
    with tqdm(total=1, desc="RazorAttention scores", unit="forward", disable=not progress, leave=False), \
            attach(model, taps=taps) as session:
        run_for_taps(model, input_ids=ids)
    weight = valid.float()  # [N, m]
    for layer in range(shape.n_layers):
        rows = session.recording.row_keys[layer][0][0].float()  # [heads, N, offsets]
        parts = {"echo": rows[..., :len(echo)], "razor_induction": rows[..., len(echo):]}
        for name, part in parts.items():
            scores[name].append((part * weight).sum((-1, -2)) / n**2)
    return {name: torch.stack(values) for name, values in scores.items()}


DESCRIPTIONS = {
    "echo": "RazorAttention echo score: attention from each token of repeats 2+ to its earlier occurrences in "
            "random ids repeated {repeats} x {period} times, summed and divided by N^2",
    "razor_induction": "RazorAttention induction score: attention from each token of repeats 2+ to the token after "
                       "each earlier occurrence, summed and divided by N^2 (same input)",
}

__all__ = ["DESCRIPTIONS", "PERIOD", "REPEATS", "offsets_and_rows", "razor_input", "razor_scores"]
