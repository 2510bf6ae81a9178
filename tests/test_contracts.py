"""Contract tests over every registry: each registered item (a kernel op, ...) runs on the tiny models of
the llama, gemma3_text and gpt_oss families, agrees with its specification and refuses a bad value in one
line. A toy item registered from this file proves that an extension is one file."""

import pytest
import torch
from families import family_model, patched_eager

from headlab.kernels import AttentionInputs, Op, all_ops, register_op
from headlab.kernels.ops import REFERENCE, Case
from headlab.surgeon.attention_math import AttentionCall

CONTRACT_FAMILIES = ("llama", "gemma3_text", "gpt_oss")  # plain; sliding windows and query/key norms; learned sinks


# --- a toy kernel op, registered from this file ---------------------------------------------------------------


def _toy_cases(call: AttentionInputs) -> list[Case]:
    def run(backend: str) -> dict:
        if backend == REFERENCE:
            return {"scaled": call.q * call.scale}
        if backend not in ("torch",):
            raise ValueError(f"toy op has no {backend} path")
        return {"scaled": torch.mul(call.q, call.scale)}

    return [Case("queries times the scale", run)]


register_op(Op("toy_scaled_queries", "queries times the logits' scale (a test's own op)", ("torch",), _toy_cases))


# --- kernel ops --------------------------------------------------------------------------------------------


def attention_call(family: str, layer: int = 0) -> AttentionInputs:
    """The q, k, v and quirks one layer of the family's tiny model sees (layer 0: a 7-key sliding window
    in gemma3_text and gpt_oss over 23 tokens, with gpt_oss's learned sinks)."""
    seen = {}

    def wrap(original):
        def recording(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            if module.layer_idx == layer:
                call = AttentionCall.read(module, query, {"scaling": scaling, **kwargs})
                seen["call"] = AttentionInputs(query.detach(), key.detach(), value.detach(), call.scaling,
                                               **call.kernel_quirks())
            return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return recording

    model = family_model(family)
    ids = torch.randint(3, 97, (2, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), patched_eager(model, wrap):
        model(input_ids=ids)
    return seen["call"]


OPS = sorted(all_ops())


def test_every_kernel_op_has_a_torch_path_and_is_known_to_the_gpu_checks():
    assert {"attention_with_stats", "column_stats", "partial_attention", "row_key_probs", "linear_attention",
            "hybrid_attention", "topk_encode", "sparse_decode", "toy_scaled_queries"} <= set(OPS)
    from gpu_compile_worker import undriven

    assert undriven() == []


@pytest.mark.parametrize("family", CONTRACT_FAMILIES)
@pytest.mark.parametrize("name", OPS)
def test_a_kernel_op_agrees_with_its_reference_on_every_backend(name, family):
    """Every backend's outputs in fp32 against the reference in float64. The contract is that an op
    computes the right thing on each family's call (its window, norms, sinks); its precision is pinned
    by the op's own tests. So the tolerance is ``2^-12`` of the output's size (plus ten times the fp32
    reference's own error): about 4,000 units of fp32 rounding, which sums of the few hundred terms of
    these calls do not reach and no wrong mask, window or sink stays under."""
    op, call = all_ops()[name], attention_call(family)
    exact_cases = op.cases(call.to(torch.float64))
    for case, exact_case in zip(op.cases(call), exact_cases):
        exact = exact_case.run(REFERENCE)
        single = case.run(REFERENCE)
        for backend in op.backends:
            got = case.run(backend)
            assert set(got) == set(exact), (case.name, backend)
            for field, want in exact.items():
                if want is None:
                    assert got[field] is None, field
                    continue
                size = 1 + float(want.abs().max())
                tolerance = 10 * float((single[field].double() - want).abs().max()) + 2**-12 * size
                assert float((got[field].double() - want).abs().max()) <= tolerance, (case.name, backend, field)


@pytest.mark.parametrize("name", OPS)
def test_a_kernel_op_refuses_a_bad_backend_in_one_line(name):
    op, call = all_ops()[name], attention_call("llama")
    case = op.cases(call)[0]
    with pytest.raises(ValueError) as refused:
        case.run("fastest")
    assert "\n" not in str(refused.value) and str(refused.value)
    if "triton" not in op.backends:
        with pytest.raises(ValueError, match="no Triton path|no triton path"):
            case.run("triton")
