"""Contract tests over every registry (kernel ops, edit kinds, score families, SAE architectures, token
scorers, commands): each registered item runs on the tiny models of the llama, gemma3_text and gpt_oss families,
round-trips through its file format and refuses a bad value in one line. The toys of ``toys.py``, each
registered from that file alone, go through the same contracts: an extension is one file."""

import json

import pytest
import toys  # noqa: F401  (registers one toy of each kind)
import torch
from conftest import CharTokenizer
from families import family_model, patched_eager

from headlab.cli import main
from headlab.commands.base import all_commands
from headlab.core.errors import HeadlabError, PlanError
from headlab.core.head_scores import HeadScores
from headlab.core.text import TextWindows, stdlib_docstrings, token_windows
from headlab.kernels import AttentionInputs, all_ops
from headlab.kernels.ops import REFERENCE
from headlab.probes.report.settings import ReportSettings
from headlab.probes.scorers.families import SCORE_FAMILIES
from headlab.probes.scorers.settings import NeedleSettings
from headlab.sae.architectures import ARCHITECTURES
from headlab.sae.settings import TrainSettings
from headlab.surgeon import EDIT_KINDS, Plan, attach, model_shape
from headlab.surgeon.attention_math import AttentionCall
from headlab.surgeon.compression import TOKEN_SCORERS, KVPress, PressSettings, token_scorer

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units

CONTRACT_FAMILIES = ("llama", "gemma3_text", "gpt_oss")  # plain; sliding windows and query/key norms; learned sinks


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


# --- edit kinds ----------------------------------------------------------------------------------------


def _request(model, ids):
    """A request every kind can run under: a span and an emphasis over tokens 3-8, VHR's reference
    outputs of every layer."""
    from headlab.surgeon import Request, reference_outputs

    span = (3, 9)
    return Request(span=span, emphasis=span, reference=reference_outputs(model, ids, span, range(model_shape(model).n_layers)))


KINDS = sorted(EDIT_KINDS)


@pytest.mark.parametrize("family", CONTRACT_FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_an_edit_kind_runs_in_prefill_and_decoding_and_round_trips_through_a_plan_file(kind, family, tmp_path):
    model = family_model(family)
    shape = model_shape(model)
    plan = Plan([EDIT_KINDS[kind].example(shape)], model=family, shape=shape)
    assert Plan.load(plan.save(tmp_path / "plan.json")).edits == plan.edits
    ids = torch.randint(3, 97, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), attach(model, plan, request=_request(model, ids)):
        logits = model(input_ids=ids).logits
        generated = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert logits.shape == (1, 17, model.config.vocab_size) and torch.isfinite(logits).all()
    assert generated.shape == (1, 20)


@pytest.mark.parametrize("kind", KINDS)
def test_an_edit_kind_refuses_a_bad_value_in_one_line(kind):
    shape = model_shape(family_model("llama"))
    edit = EDIT_KINDS[kind].example(shape).to_dict()
    for bad in ({**edit, "layer": shape.n_layers + 3}, {**edit, "heads": [shape.n_heads]}, {**edit, "heads": "x"}):
        with pytest.raises(PlanError) as refused:
            Plan.from_dict({"format": "headlab-plan/1", "edits": [bad]}).validate(shape)
        message = str(refused.value)
        assert "\n" not in message and (kind in message or "heads" in message), message


# --- score families --------------------------------------------------------------------------------------


FAMILIES = sorted(SCORE_FAMILIES)


def _report_settings(tmp_path, families) -> ReportSettings:
    labelled = tmp_path / "labels.jsonl"
    labelled.write_text("".join(json.dumps({"text": f"{word} " * 6, "label": i % 2}) + "\n"
                                for i, word in enumerate(["red", "blue", "green", "amber", "violet", "grey"] * 2)))
    return ReportSettings(text=TextWindows(windows=2, tokens=24), families=families, n_views=1,
                          needles=NeedleSettings(lengths=(320,), depths=(0.5,), n_needles=1, max_new_tokens=4),
                          probe_data=str(labelled))


@pytest.mark.parametrize("family", CONTRACT_FAMILIES)
@pytest.mark.parametrize("name", FAMILIES)
def test_a_score_family_scores_every_head_and_round_trips_through_a_scores_file(name, family, tmp_path):
    """A family scores every head of the model, or its check refuses the model in one line with the
    reason before any scoring (the razor scores need a vocabulary of 2,500 ids; these models have 97)."""
    from headlab.probes.scorers.families import FamilyInputs

    model, tokenizer = family_model(family), CharTokenizer()
    settings = _report_settings(tmp_path, ())
    windows = token_windows(tokenizer, stdlib_docstrings(), 2, 24, 0)
    inputs = FamilyInputs(model, tokenizer, family, windows, settings, progress=False)
    entry = SCORE_FAMILIES[name]
    if entry.check is not None:
        try:
            entry.check(inputs)
        except HeadlabError as refused:
            assert "\n" not in str(refused) and name == "razor", (name, str(refused))
            return
    produced = list(entry.run(inputs))
    assert produced, name
    shape = model_shape(model)
    for score in produced:
        assert score.values.shape == score.counts.shape == (shape.n_layers, shape.n_heads)
        measured = score.values[~score.values.isnan()]  # NaN: not analysed (no needle recalled by a random model)
        assert torch.isfinite(measured).all() and (score.counts >= 0).all(), score.name
        again = HeadScores.from_dict(json.loads(json.dumps(score.to_dict())))
        assert torch.equal(again.values.nan_to_num(-1), score.values.float().nan_to_num(-1))


@pytest.mark.parametrize("name", [name for name in FAMILIES if SCORE_FAMILIES[name].choice])
def test_a_score_family_is_offered_and_an_unknown_one_refused_in_one_line(name, tmp_path):
    assert _report_settings(tmp_path, (name,)).families == (name,)
    with pytest.raises(HeadlabError) as refused:
        ReportSettings(families=(name, f"{name}-nope"))
    assert "\n" not in str(refused.value) and f"{name}-nope" in str(refused.value)


# --- SAE architectures -----------------------------------------------------------------------------------


ARCHS = sorted(ARCHITECTURES)


@pytest.mark.parametrize("family", CONTRACT_FAMILIES)
@pytest.mark.parametrize("arch", ARCHS)
def test_an_sae_architecture_trains_on_head_outputs_and_round_trips_through_its_files(arch, family, tmp_path):
    from headlab.sae import (ModelActivations, ShuffleBuffer, SparseAutoencoder, Trainer, head_outputs, load_sae,
                             save_sae)

    model, shape = family_model(family), model_shape(family_model(family))
    windows = [torch.randint(3, 97, (1, 23), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    d_in = shape.n_heads * shape.head_dim
    settings = TrainSettings(arch=arch, k=4, expansion=2, train_tokens=16 * 6, batch_tokens=16, buffer_tokens=64,
                             warmup_steps=1, init_rows=32, checkpoint_every=1000)
    sae = SparseAutoencoder(d_in, 2 * d_in, arch, 4, shape.n_heads, shape.head_dim, seed=0)
    Trainer(sae, ShuffleBuffer(ModelActivations(model, windows, 1), 16, 64, seed=0), settings).run(progress=False)
    save_sae(sae, tmp_path / "sae", family, 1, "model.layers.1.self_attn.o_proj", 23)
    loaded, config = load_sae(tmp_path / "sae")
    assert config["headlab"]["arch"] == arch and config["headlab"]["layer"] == 1
    x = head_outputs(model, windows[0], 1)  # [positions, d_in], raw: the saved weights fold the input scale in
    with torch.no_grad():
        want = sae(x * sae.scale).x_hat / sae.scale
        got = loaded(x).x_hat
    assert torch.isfinite(got).all() and (got - want).abs().max() <= 1e-4 * (1 + want.abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_an_sae_architecture_is_offered_and_a_bad_one_refused_in_one_line(arch):
    assert TrainSettings(arch=arch).arch == arch
    with pytest.raises(HeadlabError) as refused:
        TrainSettings(arch=f"{arch}-nope")
    assert "\n" not in str(refused.value) and f"{arch}-nope" in str(refused.value)


# --- token scorers ---------------------------------------------------------------------------------------


SCORERS = sorted(TOKEN_SCORERS)


@pytest.mark.parametrize("family", CONTRACT_FAMILIES)
@pytest.mark.parametrize("name", SCORERS)
def test_a_token_scorer_compresses_every_global_layer_to_its_budget_and_decodes(name, family):
    """A press with the scorer holds 6 of 23 positions per KV head of every global layer after the
    prefill (its sinks and window among them), keeps the sequence's length, and decodes finite logits."""
    model = family_model(family)
    press = KVPress(model, PressSettings(scorer=name, budget=None, tokens=6, sinks=1, window=2, observation=4))
    ids = torch.randint(3, 97, (1, 23), generator=torch.Generator().manual_seed(5))
    cache = press.cache(23)
    with attach(model, compression=press), torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        logits = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits
    for layer in press.layers:
        held = cache.layers[layer]
        assert held.held_counts() == [7] * model_shape(model).n_kv_heads
        positions = [set(head.positions[:head.held].tolist()) for head in held.heads]
        assert all({0, 21, 22, 23} <= kept for kept in positions), positions  # sink, window, the new token
    assert cache.get_seq_length() == 24 and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", SCORERS)
def test_a_token_scorer_is_offered_and_an_unknown_one_refused_in_one_line(name):
    assert token_scorer(name).name == name
    with pytest.raises(HeadlabError) as refused:
        token_scorer(f"{name}-nope")
    assert "\n" not in str(refused.value) and f"{name}-nope" in str(refused.value)


# --- commands --------------------------------------------------------------------------------------------


COMMANDS = sorted(all_commands())
REFUSED = {("convert", "gpt_oss"): "has parameters of its own (sinks"}  # what a command refuses, and why


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per contract family, a tiny checkpoint with SmolLM2's tokenizer (the commands need a real one) and
    the inputs the commands' examples name: a scores file, a plan, a saved autoencoder, a text file."""
    import transformers
    from families import BY_NAME, COMMON
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headlab.sae import SparseAutoencoder, save_sae
    from headlab.surgeon import HeadScale
    from headlab.surgeon.models import model_directory

    tokenizer = AutoTokenizer.from_pretrained(model_directory("smollm2-135m"))
    root = tmp_path_factory.mktemp("contract-checkpoints")
    (root / "text.txt").write_text(stdlib_docstrings()[:4000])
    found = {}
    for family in CONTRACT_FAMILIES:
        # sizes in multiples of 16 bytes: a checkpoint loads its experts with grouped matrix products
        sizes = {"vocab_size": len(tokenizer), "max_position_embeddings": 4096, "head_dim": 8, "hidden_size": 40,
                 "intermediate_size": 40}
        config = transformers.CONFIG_MAPPING[family](**{**COMMON, **BY_NAME[family].config, **sizes})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval()
        folder = root / family
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        shape = model_shape(model)
        values = 0.05 * torch.rand(shape.n_layers, shape.n_heads, generator=torch.Generator().manual_seed(1))
        values[2, :2] = 0.5  # two retrieval heads: the rest are eligible for the random sets
        scores = root / f"{family}-scores.json"
        scores.write_text(json.dumps({"format": "headlab-scores/1", "scores": {
            "retrieval": HeadScores("retrieval", values, torch.ones_like(values), str(folder)).to_dict()}}))
        plan = Plan([HeadScale(2, (0, 1), 0.0)], model=str(folder), shape=shape).save(root / f"{family}-plan.json")
        d_in = shape.n_heads * shape.head_dim
        sae = root / f"{family}-sae"
        save_sae(SparseAutoencoder(d_in, 2 * d_in, "topk", 4, shape.n_heads, shape.head_dim, seed=0), sae,
                 str(folder), 1, "self_attn.o_proj input", 64, model_spec=str(folder))
        found[family] = {"model": str(folder), "scores": str(scores), "plan": str(plan), "sae": str(sae),
                         "text": str(root / "text.txt")}
    return found


@pytest.mark.slow
@pytest.mark.parametrize("family", CONTRACT_FAMILIES)
@pytest.mark.parametrize("name", COMMANDS)
def test_a_commands_example_runs_on_every_family_and_writes_files_that_read_back(name, family, checkpoints,
                                                                                 tmp_path, capsys):
    """A command's example runs on a tiny model of the family (or is refused, where the family cannot do
    what the command does, in one line with the reason); every JSON it writes parses and every page is
    headlab's."""
    out = tmp_path / "out"
    argv = all_commands()[name].example.format(**checkpoints[family], out=out).split()
    status = main([*name.split(), *argv])
    err = capsys.readouterr().err
    if (name, family) in REFUSED:
        lines = [line for line in err.splitlines() if "error:" in line]
        assert status == 2 and len(lines) == 1 and REFUSED[name, family] in lines[0], err
        return
    assert status == 0, err
    for path in out.rglob("*") if out.exists() else ():
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".html":
            assert 'name="generator" content="headlab"' in path.read_text()[:2000], path


@pytest.mark.parametrize("name", COMMANDS)
def test_a_command_refuses_a_value_below_an_options_range_in_one_line_before_any_model_loads(name, checkpoints,
                                                                                               tmp_path, capsys):
    from headlab.core.kinds import Integer
    from headlab.core.settings import _options

    command = all_commands()[name]
    bounded = [(option.flag, option.kind.low) for cls in command.settings for _, option, _, _ in _options(cls)
               if isinstance(option.kind, Integer) and option.kind.low is not None]
    if not bounded:
        assert not command.settings or name == "models", name
        return
    flag, low = bounded[0]
    argv = command.example.format(**checkpoints["llama"], out=tmp_path / "out").split()
    loaded = []
    with _model_loads_counted(loaded), pytest.raises(SystemExit) as exited:  # the parser refuses it
        main([*name.split(), *argv, flag, str(low - 1)])
    status = exited.value.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and flag in err, err
    assert loaded == [] and not (tmp_path / "out").exists()


def _model_loads_counted(loaded: list):
    """A context in which every weight load of headlab.surgeon.load_model is appended to ``loaded``."""
    from unittest import mock

    import headlab.surgeon.models as models

    real = models.load_model

    def counted(*args, **kwargs):
        loaded.append(args)
        return real(*args, **kwargs)

    return mock.patch.object(models, "load_model", counted)


def test_an_empty_search_and_an_empty_plan_say_so(checkpoints, tmp_path, capsys):
    """A calibration search that keeps no head says what to try, and eval of its empty plan says the plan
    changes nothing (no accuracy can beat the unedited model's by more than 1)."""
    model = checkpoints["llama"]["model"]
    task = ["--task", "kv-recall", "--size", "8"]
    assert main(["calibrate", model, *task, "--layers", "2", "--margin", "1", "--out", str(tmp_path / "plan.json")]) == 0
    err = capsys.readouterr().err
    assert "the plan is empty; try a smaller --margin" in err, err
    assert main(["eval", model, *task, "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "eval.json")]) == 0
    assert "has no edits" in capsys.readouterr().err
