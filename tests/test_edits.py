"""Edit functions against direct per-row loops of the published algorithms (ACT, VAR, PASTA, VHR)."""

import math

import pytest
import torch

from headlab.kernels import attention_with_stats, partial_attention
from headlab.kernels.reference import attention_probs_reference
from headlab.surgeon.edits import formulas

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units


def random_probs(batch=2, heads=3, n=11, seed=0, sink_boost=4.0):
    """Causal probabilities with a strong first-token sink; the second batch row left-padded by 3."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, n, n, generator=gen, dtype=torch.float64)
    logits[..., 0] += sink_boost
    logits[..., 5] += sink_boost / 2
    key_valid = torch.ones(batch, n, dtype=torch.bool)
    if batch > 1:
        key_valid[1, :3] = False
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    visible = (causal[None, None] & key_valid[:, None, None, :]).expand(batch, heads, n, n)
    probs = torch.softmax(logits.masked_fill(~visible, -math.inf), -1).nan_to_num(0.0)
    return probs, visible, key_valid


def loop_mean_received(a, visible, query_valid):
    batch, heads, nq, nk = a.shape
    out = torch.zeros(batch, heads, nk, dtype=a.dtype)
    for b in range(batch):
        for h in range(heads):
            for j in range(nk):
                rows = [i for i in range(nq) if visible[b, h, i, j] and query_valid[b, i]]
                out[b, h, j] = sum(a[b, h, i, j] for i in rows) / len(rows) if rows else 0.0
    return out


def loop_act_row(row, visible_row, sinks, beta):
    """Step 4 of ACT on one row, as published (with headlab's guard for m = 0 / no non-sink mass)."""
    m = sum(row[j] for j in range(len(row)) if sinks[j] and visible_row[j])
    if m == 0 or 1 - m <= 1e-12:
        return row.clone()
    out = row.clone()
    for j in range(len(row)):
        if not visible_row[j]:
            continue
        out[j] = beta * row[j] if sinks[j] else row[j] * (1 - beta * m) / (1 - m)
    return out


def test_mean_received_matches_loop():
    a, visible, key_valid = random_probs()
    got = formulas.mean_received(a, visible[:, :1], key_valid)
    assert torch.allclose(got, loop_mean_received(a, visible, key_valid), atol=1e-12)


def test_sink_set_threshold_and_drop_first():
    scores = torch.tensor([[[0.5, 0.05, 0.3, 0.2, 0.0]]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    assert formulas.act_sink_set(scores, valid, 0.1, drop_first="none").tolist() == [[[True, False, True, True, False]]]
    assert formulas.act_sink_set(scores, valid, 0.1, drop_first="lowest").tolist() == [[[False, False, True, True, False]]]
    low_first = torch.tensor([[[0.05, 0.5, 0.3, 0.0, 0.0]]])
    assert formulas.act_sink_set(low_first, valid, 0.1, drop_first="lowest").tolist() == [[[False, False, True, False, False]]]
    assert formulas.act_sink_set(low_first, valid, 0.1, drop_first="position0").tolist() == [[[False, True, True, False, False]]]
    assert formulas.act_sink_set(scores, valid, relative_c=1.4, drop_first="none").tolist() == [[[True, False, True, False, False]]]
    padded = torch.tensor([[False, True, True, True, True]])
    assert formulas.act_sink_set(low_first, padded, 0.1, drop_first="position0").tolist() == [[[False, False, True, False, False]]]


@pytest.mark.parametrize("beta", [0.4, 0.0, 0.9])
def test_act_reweight_matches_the_per_row_loop_and_keeps_row_sums(beta):
    a, visible, key_valid = random_probs()
    scores = formulas.mean_received(a, visible[:, :1], key_valid)
    sinks = formulas.act_sink_set(scores, key_valid, 0.1, drop_first="none")
    got = formulas.act_reweight(a, sinks, visible, beta)
    for b in range(a.shape[0]):
        for h in range(a.shape[1]):
            for i in range(a.shape[2]):
                want = loop_act_row(a[b, h, i], visible[b, h, i], sinks[b, h], beta)
                assert torch.allclose(got[b, h, i], want, atol=1e-12), (b, h, i)
    live = visible.any(-1)
    assert torch.allclose(got.sum(-1)[live], torch.ones_like(got.sum(-1)[live]), atol=1e-12)


def test_act_beta_one_and_no_sinks_are_exact_noops():
    a, visible, key_valid = random_probs()
    sinks = formulas.act_sink_set(formulas.mean_received(a, visible[:, :1], key_valid), key_valid)
    assert torch.equal(formulas.act_reweight(a, sinks, visible, 1.0), a)
    assert torch.equal(formulas.act_reweight(a, torch.zeros_like(sinks), visible, 0.4), a)


def loop_var_row(row, sinks, span, p, m_min, rho):
    """VAR on one row as released (VisAttnSink logic.py: HeadFork leaves the layer alone when no
    sink token lies inside the span; attn_redist moves (1 - p) of every sink's weight to the span's
    non-sink tokens in proportion)."""
    if not any(span[j] and sinks[j] for j in range(len(row))):
        return row.clone()
    span_mass = sum(row[j] for j in range(len(row)) if span[j])
    if span_mass < m_min:
        return row.clone()
    if sum(row[j] for j in range(len(row)) if span[j] and sinks[j]) / span_mass > rho:
        return row.clone()
    receivers = sum(row[j] for j in range(len(row)) if span[j] and not sinks[j])
    if receivers <= 1e-6:
        return row.clone()
    omega = (1 - p) * sum(row[j] for j in range(len(row)) if sinks[j])
    out = row.clone()
    for j in range(len(row)):
        if sinks[j]:
            out[j] = p * row[j]
        elif span[j]:
            out[j] = row[j] + omega * row[j] / receivers
    return out


@pytest.mark.parametrize("keep", [0.6, 0.0])
def test_var_matches_the_per_row_loop_and_keeps_row_sums(keep):
    a, visible, _ = random_probs(n=12, sink_boost=3.0)
    sinks = torch.zeros(2, 1, 12, dtype=torch.bool)
    sinks[:, :, 0] = True
    sinks[0, :, 6] = True  # a sink inside the span
    span = torch.zeros(2, 1, 12, dtype=torch.bool)
    span[:, :, 4:8] = True
    rows = torch.zeros(2, 12, dtype=torch.bool)
    rows[:, 8:] = True
    got = formulas.var_redistribute(a, sinks, span, rows, keep, 0.2, 0.5)
    edited = 0
    for b in range(2):
        for h in range(a.shape[1]):
            for i in range(12):
                want = loop_var_row(a[b, h, i], sinks[b, 0], span[b, 0], keep, 0.2, 0.5) if rows[b, i] else a[b, h, i]
                edited += int(not torch.equal(want, a[b, h, i]))
                assert torch.allclose(got[b, h, i], want, atol=1e-12), (b, h, i)
    assert edited > 0, "the fixture must select some rows"
    assert torch.equal(got[1], a[1]), "no sink inside row 1's span: the release leaves it alone"
    live = visible.any(-1)
    assert torch.allclose(got.sum(-1)[live], torch.ones_like(got.sum(-1)[live]), atol=1e-12)
    assert torch.equal(formulas.var_redistribute(a, sinks, span, rows, 1.0), a)


def test_pasta_equals_the_renormalised_form_and_alpha_one_is_exact():
    a, visible, _ = random_probs(batch=1)
    logits = torch.log(a.clamp_min(1e-300)).masked_fill(~visible, torch.finfo(torch.float64).min)
    emphasis = torch.zeros(1, 11, dtype=torch.bool)
    emphasis[:, 3:6] = True
    prompt = torch.ones(1, 11, dtype=torch.bool)
    prompt[:, 9:] = False  # the last two keys were generated
    steered = torch.softmax(formulas.pasta_bias(logits, emphasis[:, None], prompt, 0.01), -1)
    factor = torch.where(prompt & ~emphasis, 0.01, 1.0).double()[:, None, None, :]
    want = a * factor
    want = want / want.sum(-1, keepdim=True)
    assert torch.allclose(steered, want, atol=1e-12)
    assert torch.equal(formulas.pasta_bias(logits, emphasis[:, None], prompt, 1.0), logits)


def test_vhr_selects_heads_above_the_median_after_outlier_removal():
    vhd = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0, 2.5]])
    energy = torch.tensor([[1.0, 1.0, 1.0, 1.0, 100.0, 1.0]])  # head 4 is an outlier in both
    chosen = formulas.vhr_select(vhd, energy)
    cleaned = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 2.5])
    assert chosen[0].tolist() == (cleaned > cleaned.median()).tolist() == [False, False, True, True, False, True]


def test_act_output_from_lse_equals_the_edited_map():
    """The LSE form: o' = γ(o − P) + βP from the rows' LSE and a partial pass over the sinks (fp64, so
    rows whose sink mass is within rounding of 1 are not ambiguous)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 6, 20, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 20, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 20, 8, generator=gen, dtype=torch.float64)
    q[..., 0] += 2.0
    k[:, :, 0, 0] += 3.0
    s = torch.matmul(q, k.repeat_interleave(3, dim=1).transpose(-1, -2)) * 8**-0.5
    visible = torch.tril(torch.ones(20, 20, dtype=torch.bool)).expand(2, 6, 20, 20)
    lse = torch.logsumexp(s.masked_fill(~visible, -math.inf), -1)
    p = torch.exp(s - lse[..., None]).masked_fill(~visible, 0.0)
    out = torch.matmul(p, v.repeat_interleave(3, dim=1))
    mass, partial = partial_attention(q, k, v, lse, torch.tensor([[0, 7], [0, -1]]))
    corrected = formulas.act_output_from_lse(out, partial, mass, 0.4)
    sinks = torch.zeros(2, 6, 20, dtype=torch.bool)
    sinks[:, :, 0] = True
    sinks[0, :, 7] = True
    want = torch.matmul(formulas.act_reweight(p, sinks, visible, 0.4), v.repeat_interleave(3, dim=1))
    assert torch.allclose(corrected, want, atol=1e-10)
    assert torch.allclose(mass, torch.where(sinks[:, :, None, :] & visible, p, 0.0).sum(-1), atol=1e-12)


def test_partial_attention_with_the_stats_ops_lse():
    q, k, v = (torch.randn(1, 3, 30, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    k, v = k[:, :1], v[:, :1]
    stats = attention_with_stats(q, k, v, backend="torch")
    mass, partial = partial_attention(q, k, v, stats.lse, torch.tensor([[0, 1, 2]]))
    p, _, _ = attention_probs_reference(q, k, 16**-0.5, True)
    assert torch.allclose(mass, p[..., :3].sum(-1), atol=1e-6)
    assert torch.allclose(partial, torch.matmul(p[..., :3], v[:, :, :3].expand(1, 3, 3, 16)), atol=1e-5)


def test_sink_ratio():
    hidden = torch.ones(1, 3, 8)
    hidden[0, 0, 5] = 400.0
    ratio = formulas.sink_ratio(hidden, [5, 2])
    assert ratio[0, 0] == pytest.approx(400.0 / math.sqrt((7 + 400.0**2) / 8 + 1e-6))
    assert ratio[0, 1] == pytest.approx(1.0 / math.sqrt(1 + 1e-6))


@pytest.mark.parametrize("rest", [1e-1, 3e-5, 3e-6, 1e-7])
def test_act_in_fp32_is_within_1e6_of_fp64_when_the_sinks_hold_nearly_all_mass(rest):
    """γ from the directly summed non-sink mass: no cancellation of 1 - m (that form erred by
    1.9e-4 at a non-sink mass of 3e-5 and 1.5e-3 at 3e-6)."""
    gen = torch.Generator().manual_seed(3)
    n = 64
    logits = torch.randn(4, 1, 8, n, generator=gen, dtype=torch.float64)
    others = logits[..., 2:].exp().sum(-1, keepdim=True)
    logits[..., :2] = torch.log(others * (1 - rest) / rest / 2)  # the two sinks hold 1 - rest
    a64 = torch.softmax(logits, -1)
    sinks = torch.zeros(4, 1, n, dtype=torch.bool)
    sinks[..., :2] = True
    visible = torch.ones(4, 1, 8, n, dtype=torch.bool)
    exact = formulas.act_reweight(a64, sinks, visible, 0.4)
    got = formulas.act_reweight(a64.float(), sinks, visible, 0.4)
    non_sink = a64[..., 2:].sum(-1)
    assert torch.allclose(non_sink, torch.full_like(non_sink, rest), rtol=1e-9)
    assert (got.double() - exact).abs().max() <= 1e-6
    assert torch.allclose(got.double().sum(-1), a64.sum(-1), atol=1e-6)


def release_pasta_mask(n_key, input_len, sections, alpha, position):
    """The bias the released PASTA adds to one row (pastalib edit_multisection_attention): per section,
    log alpha on the section (include), outside it up to the input's end (exclude), or on the whole
    input (generation); include then takes log alpha off the whole input once."""
    bias = torch.zeros(n_key, dtype=torch.float64)
    log_alpha = math.log(alpha)
    for ti, tj in sections:
        if position == "include":
            bias[ti:tj] += log_alpha
        elif position == "exclude":
            bias[:ti] += log_alpha
            bias[tj:input_len] += log_alpha
        else:
            bias[:input_len] += log_alpha
    if position == "include":
        bias[:input_len] -= log_alpha
    return bias


@pytest.mark.parametrize("position", ["exclude", "include", "generation"])
def test_pasta_per_section_equals_the_release_on_decode_rows(position):
    """Two sections; keys 10.. were generated (decode rows see them). The per-section form adds the
    release's bias exactly; the default union form gives the same softmax at prefill (prompt keys
    only) but not on decode rows, for the exclude position with two sections."""
    n_key, input_len, sections = 13, 10, [(2, 4), (6, 8)]
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 2, 3, n_key, generator=gen, dtype=torch.float64)
    masks = torch.zeros(1, 2, n_key, dtype=torch.bool)
    for s, (ti, tj) in enumerate(sections):
        masks[0, s, ti:tj] = True
    prompt = torch.zeros(1, n_key, dtype=torch.bool)
    prompt[0, :input_len] = True
    alpha = 0.05 if position != "include" else 20.0
    got = formulas.pasta_bias(logits, masks, prompt, alpha, position, per_section=True)
    assert torch.allclose(got - logits, release_pasta_mask(n_key, input_len, sections, alpha, position).expand_as(got),
                          atol=1e-12)
    union = formulas.pasta_bias(logits, masks, prompt, alpha, position)
    prefill = (slice(None), slice(None), slice(None), slice(0, input_len))
    assert torch.allclose(torch.softmax(union[prefill], -1), torch.softmax(got[prefill], -1), atol=1e-12)
    if position == "exclude":
        gap = (torch.softmax(union, -1) - torch.softmax(got, -1)).abs().max()
        assert gap > 0.05, "on decode rows the two forms differ (generated keys are never biased)"
