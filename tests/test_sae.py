"""Sparse autoencoders: sparse ops against dense references, constraints, initialisation,
deterministic and resumable training, data parallelism, save/load, evaluation through the hook,
attribution and the dashboard."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bounds import U
from conftest import tiny_llama
from safetensors.torch import load_file

from headlab.core.errors import InputFileError
from headlab.cli import main
from headlab.kernels.reference import sparse_decode_reference, topk_encode_reference
from headlab.kernels.sae_codes import sparse_decode, topk_encode
from headlab.sae.jump import JumpStep
from headlab.sae.saving import save_sparsity
from headlab.sae import (
    CachedActivations, ModelActivations, ShuffleBuffer, SparseAutoencoder, TrainSettings, Trainer, cache_activations,
    collect_examples, decoder_head_shares, direct_feature_attribution, evaluate_sae, geometric_median, head_outputs,
    initialise, load_sae, save_sae, write_dashboard,
)
from headlab.surgeon import HeadScale, Plan, attach

sys.path.insert(0, str(Path(__file__).parent))
from sae_worker import SETTINGS, Chunks  # noqa: E402

WORKER = Path(__file__).parent / "sae_worker.py"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_sparse_topk_ops_match_dense_reference_values_and_gradients(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 20, generator=gen, dtype=dtype)
    params = [torch.randn(*s, generator=gen, dtype=dtype).requires_grad_() for s in ((20, 300), (300,), (20,),
                          (300, 20))]
    w_enc, b_enc, b_dec, w_dec = params
    grad_out = torch.randn(37, 20, generator=gen, dtype=dtype)
    values, indices = topk_encode(x, w_enc, b_enc, b_dec, 7)
    ours = sparse_decode(values, indices, w_dec, b_dec)
    (ours * grad_out).sum().backward()
    ours_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    reference = sparse_decode_reference(*topk_encode_reference(x, w_enc, b_enc, b_dec, 7), w_dec, b_dec)
    (reference * grad_out).sum().backward()
    assert torch.allclose(ours, reference, atol=tol)
    for mine, p in zip(ours_grads, params):
        assert torch.allclose(mine, p.grad, atol=tol)


def test_decoder_constraint_and_architectures():
    sae = SparseAutoencoder(12, 48, "topk", 4, n_heads=3)
    x = torch.randn(10, 12)
    sae(x).x_hat.pow(2).sum().backward()
    terms = (sae.W_dec.grad.abs() * sae.W_dec.abs()).sum(1)  # the dot products' magnitudes, per row
    sae.remove_parallel_gradient()
    # projecting out w (|w| = 1) and measuring again are two dot products over d = 12 terms: fp32 bound
    assert ((sae.W_dec.grad * sae.W_dec).sum(1).abs() <= 4 * 12 * U * terms).all()
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalise_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48))
    batch = SparseAutoencoder(12, 48, "batchtopk", 4).train()
    assert (batch(x).codes > 0).sum() <= 40 and (batch(x).codes > 0).sum(1).float().std() > 0  # B·k over the batch
    batch.eval()
    batch.threshold.fill_(1e9)
    assert (batch(x).codes == 0).all()
    jump = SparseAutoencoder(12, 48, "jumprelu")
    out = jump(x)
    (out.x_hat.sum() + JumpStep.apply(out.pre, jump.threshold).sum()).backward()
    assert jump.threshold.grad is not None
    with pytest.raises(ValueError):
        SparseAutoencoder(12, 48, "gated")


def test_geometric_median_beats_the_mean_under_an_outlier():
    points = torch.cat([torch.randn(50, 3) * 0.1, torch.tensor([[100.0, 100.0, 100.0]])])
    median = geometric_median(points)
    assert median.norm() < 0.2 and points.mean(0).norm() > 1
    cost = lambda c: (points - c).norm(dim=1).sum()  # noqa: E731
    assert all(cost(median) <= cost(median + d) + 1e-4 for d in torch.eye(3) * 0.01)


def test_initialisation_normalises_and_matches_norms():
    sae = SparseAutoencoder(12, 48, "topk", 4)
    sample = torch.randn(500, 12) * 7
    initialise(sae, sample)
    assert (sample * sae.scale).pow(2).sum(1).mean().item() == pytest.approx(12, rel=1e-4)
    x = sample * sae.scale
    with torch.no_grad():
        reconstructed = (sae(x).x_hat - sae.b_dec).norm(dim=1).mean().item()
    assert reconstructed == pytest.approx((x - sae.b_dec).norm(dim=1).mean().item(), rel=1e-4)


def test_shuffle_buffer_is_deterministic_and_resumes():
    first, second = ShuffleBuffer(Chunks(0), 8, 32, seed=3), ShuffleBuffer(Chunks(0), 8, 32, seed=3)
    for _ in range(5):
        assert torch.equal(first.next_batch(), second.next_batch())
    state = first.state_dict()
    expected = [first.next_batch() for _ in range(40)]
    resumed = ShuffleBuffer(Chunks(0), 8, 32, seed=99)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(), e) for e in expected)
    assert resumed.epoch >= 1  # 40 batches of 8 outrun the 240 rows


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    def run(folder, stop_at=None):
        sae = SparseAutoencoder(12, 48, "topk", 4, 3, seed=0)
        settings = TrainSettings(**{**SETTINGS.__dict__, "checkpoint_every": 2, "dead_tokens": 32})
        Trainer(sae, ShuffleBuffer(Chunks(0), 16, 64, seed=0), settings, folder).run(progress=False, stop_at=stop_at)
        return sae

    whole = run(tmp_path / "whole")
    run(tmp_path / "killed", stop_at=5)  # dies after step 5; the last checkpoint is step 4
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    resumed = run(tmp_path / "killed")
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    with pytest.raises(ValueError, match="other settings"):
        sae = SparseAutoencoder(12, 48, "topk", 4, 3)
        Trainer(sae, ShuffleBuffer(Chunks(0), 16, 64), TrainSettings(k=5), tmp_path / "killed").run(progress=False)


@pytest.mark.slow
def test_two_gloo_ranks_train_like_one_process_on_the_global_batch(tmp_path):
    subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one")], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(WORKER), str(tmp_path / "two")], check=True, timeout=180)
    one = load_file(tmp_path / "one" / "weights.rank0.safetensors")
    ranks = [load_file(tmp_path / "two" / f"weights.rank{r}.safetensors") for r in (0, 1)]
    for name, value in one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # gradients were synchronised
        assert torch.allclose(ranks[0][name], value, atol=1e-5), name


def test_sparsity_is_stored_as_saelens_log10_frequency(tmp_path):
    frequency = torch.tensor([0.0, 1e-4, 0.5, 1.0])
    save_sparsity(tmp_path, frequency)
    stored = load_file(tmp_path / "sparsity.safetensors")["sparsity"]
    assert torch.allclose(stored.double(), torch.log10(frequency.double() + 1e-10), atol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_save_and_load_give_identical_outputs(tmp_path, arch):
    sae = SparseAutoencoder(12, 48, arch, 4, 3, seed=1)
    initialise(sae, torch.randn(300, 12) * 5)
    with torch.no_grad():
        sae.threshold.fill_(0.05) if arch != "relu" and arch != "topk" else None
    sae.eval()
    assert float(sae.scale) != 1.0  # the input scale that saving moves into the codes
    save_sae(sae, tmp_path / "sae", "org/tiny", 2, "LlamaAttention o_proj input", 64, model_spec="tiny",
             prepend_bos=True, dataset_path="text.txt")
    loaded, config = load_sae(tmp_path / "sae")
    assert config["metadata"]["hook_name"] == "blocks.2.attn.hook_z" and config["d_sae"] == 48
    assert config["architecture"] == {"relu": "standard", "topk": "topk"}.get(arch, "jumprelu")
    assert config["metadata"]["sae_lens_version"].startswith("6.")  # read as a 6.x config, not rebuilt
    assert (config["metadata"]["model_name"], config["headlab"]["model_spec"]) == ("org/tiny", "tiny")
    assert config["metadata"]["prepend_bos"] is True and config["metadata"]["neuronpedia_id"] is None
    saved = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    assert torch.allclose(saved["W_dec"].norm(dim=1), torch.ones(48), atol=1e-6)  # unit-norm decoder rows
    x = torch.randn(20, 12) * 5
    assert torch.allclose(loaded.reconstruct(x), sae.reconstruct(x), atol=1e-4)
    assert torch.allclose(loaded.encode(x), sae.encode(x) / sae.scale, rtol=1e-5, atol=1e-6)
    assert torch.equal(loaded.encode(x) > 0, sae.encode(x) > 0)
    with pytest.raises(InputFileError, match="cfg.json is missing"):
        load_sae(tmp_path)


def test_head_outputs_are_the_o_proj_input_and_the_cache_round_trips(tmp_path):
    model = tiny_llama("gqa")
    ids = torch.randint(1, 90, (1, 10))
    seen = []
    hook = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0]))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    assert torch.allclose(head_outputs(model, ids, 1), seen[0], atol=1e-6)
    source = ModelActivations(model, [ids, ids[:, :6]], 1)
    assert source.chunk(1).shape == (5, 54)  # first token excluded
    cached = cache_activations(source, tmp_path / "cache", shard_tokens=4, progress=False, identity={"model": "m"})
    assert len(cached) == 2 and torch.equal(cached.chunk(0), source.chunk(0))
    mine = {"model": "m", "layer": 1, "exclude_first": True}
    assert torch.equal(CachedActivations(tmp_path / "cache", mine).chunk(1), source.chunk(1))
    with pytest.raises(InputFileError, match="holds other activations .layer 1 there, 2 here."):
        CachedActivations(tmp_path / "cache", {**mine, "layer": 2})
    shard = tmp_path / "cache" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one bit of the last activation
    shard.write_bytes(bytes(data))
    with pytest.raises(InputFileError, match="shard-00001.safetensors was changed after headlab wrote it"):
        CachedActivations(tmp_path / "cache", mine).chunk(1)
    shard.write_bytes(bytes(data[:-4]))
    with pytest.raises(InputFileError, match="is missing or not the .* bytes the cache's manifest records"):
        CachedActivations(tmp_path / "cache", mine)


def identity_sae(d_in: int, n_heads: int) -> SparseAutoencoder:
    """relu(x) − relu(−x) = x: a ReLU autoencoder that reconstructs exactly."""
    sae = SparseAutoencoder(d_in, 2 * d_in, "relu", n_heads=n_heads)
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae.eval()


def test_evaluation_of_an_exact_and_of_a_zero_autoencoder():
    model = tiny_llama("gqa")
    windows = [torch.randint(1, 90, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    metrics, frequency = evaluate_sae(model, identity_sae(54, 9), windows, layer=1)
    assert metrics["explained_variance"] == pytest.approx(1, abs=1e-6)
    assert metrics["ce_loss_recovered"] == pytest.approx(1, abs=1e-4) and metrics["kl_sae"] < 1e-8
    zero = identity_sae(54, 9)
    with torch.no_grad():
        zero.W_dec.zero_()
    metrics, _ = evaluate_sae(model, zero, windows, layer=1)
    assert metrics["ce_loss_recovered"] == pytest.approx(0, abs=1e-6) and metrics["dead_fraction"] < 1
    assert metrics["explained_variance"] < 0.1


def test_zero_splice_equals_ablating_every_head_with_a_plan():
    model = tiny_llama("mqa")
    ids = torch.randint(1, 90, (1, 12))
    with torch.no_grad(), attach(model, splice={1: torch.zeros_like}):
        spliced = model(input_ids=ids).logits
    with torch.no_grad(), attach(model, Plan([HeadScale(1, tuple(range(5)), 0.0)])):
        planned = model(input_ids=ids).logits
    assert torch.allclose(spliced, planned, atol=1e-6)


def test_head_shares_and_direct_feature_attribution_decompose_exactly():
    sae = SparseAutoencoder(54, 20, "relu", n_heads=9, seed=2)
    with torch.no_grad():
        sae.W_dec[0].zero_()
        sae.W_dec[0, 12:18] = 1.0  # latent 0 writes only into head 2's block
    shares = decoder_head_shares(sae)
    assert torch.allclose(shares[0], torch.eye(9)[2]) and torch.allclose(shares.sum(1), torch.ones(20))
    model = tiny_llama("gqa")
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    ids = torch.randint(1, 90, (1, 14))
    dfa = direct_feature_attribution(model, sae, ids, layer=1, position=9, latent=3)
    assert dfa.by_source.shape == (9, 14) and dfa.by_source[:, 10:].abs().max() == 0  # causal
    assert dfa.by_head.sum().item() + dfa.bias == pytest.approx(dfa.pre_activation, abs=1e-4)


def test_dashboard_escapes_tokens(tmp_path):
    model = tiny_llama("gqa")
    sae = identity_sae(54, 9)
    windows = [torch.randint(1, 90, (1, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    examples = collect_examples(model, sae, windows, 1, [0, 5], n_top=3)
    assert len(examples[0].top) == 3 and examples[0].top[0][0] >= examples[0].top[-1][0]
    tokens = [["<script>alert(1)</script>"] * 12 for _ in windows]
    page = write_dashboard(tmp_path / "d.html", sae, examples, tokens, "t <b>").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "t &lt;b&gt;" in page
    assert "latent-5" in page and "<svg" in page


def test_sae_cli_errors(tmp_path, capsys):
    assert main(["sae", "eval", str(tmp_path), "--out", str(tmp_path / "m.json")]) == 2
    assert "cfg.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sae", "train", "--help"])
    assert "--expansion" in capsys.readouterr().out


def relu_trainer(folder=None, **overrides):
    settings = TrainSettings(**{**SETTINGS.__dict__, "arch": "relu", "lr": 1e-2, "l1_coefficient": 0.01, **overrides})
    sae = SparseAutoencoder(12, 48, "relu", n_heads=3, seed=0)
    return Trainer(sae, ShuffleBuffer(Chunks(0), 16, 64, seed=0), settings, folder)


def test_resampling_reinitialises_dead_latents_from_high_loss_inputs():
    trainer = relu_trainer()
    trainer.run(progress=False, stop_at=2)  # initialised, with Adam moments
    sae = trainer.sae
    before = {name: value.clone() for name, value in sae.state_dict().items()}
    moments = {name: value.clone() for name, value in trainer.optimizer.state[sae.W_dec].items()}
    trainer.window_fires.fill_(50)
    trainer.window_fires[:5] = 0  # latents 0-4 never fired in this window
    trainer.window_tokens = 100
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(3))
    x[7] *= 100  # its squared loss outweighs the other rows' by far
    alive_norm = sae.W_enc[:, 5:].norm(dim=0).mean()
    assert trainer.resample(x) == 5
    direction = torch.nn.functional.normalize(x[7] - sae.b_dec, dim=0)
    assert torch.allclose(sae.W_dec[:5], direction.expand(5, -1), atol=1e-6)
    assert torch.allclose(sae.W_enc[:, :5].norm(dim=0), 0.2 * alive_norm.expand(5), atol=1e-6)
    assert torch.equal(sae.b_enc[:5], torch.zeros(5))
    for name in ("W_dec", "b_enc"):
        assert torch.equal(sae.state_dict()[name][5:], before[name][5:]), name
    assert torch.equal(sae.W_enc[:, 5:], before["W_enc"][:, 5:])
    for name, moment in trainer.optimizer.state[sae.W_dec].items():
        if moment.dim():
            assert not moment[:5].any() and torch.equal(moment[5:], moments[name][5:]), name
    assert trainer.window_tokens == 0 and not trainer.window_fires.any() and trainer.last_resample == trainer.step
    # the warm-up restarts at the resample; the cosine runs over the whole run
    settings = TrainSettings(arch="relu", train_tokens=100 * 4096, batch_tokens=4096, warmup_steps=5)
    assert settings.lr_factor(40, warm_from=40) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.4)))
    assert settings.lr_factor(44, warm_from=40) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.44)))


def test_relu_run_with_resampling_resumes_to_the_same_weights(tmp_path):
    overrides = {"resample_every": 3, "dead_frequency": 0.3, "checkpoint_every": 2}

    def run(folder, stop_at=None):
        trainer = relu_trainer(folder, **overrides)
        trainer.run(progress=False, stop_at=stop_at)
        return trainer

    whole = run(tmp_path / "whole")
    assert whole.resampled == 2 and whole.last_resample == 6  # steps 3 and 6 of 8
    assert whole.optimizer.param_groups[0]["betas"] == (0.0, 0.9999)
    run(tmp_path / "killed", stop_at=5)
    resumed = run(tmp_path / "killed")
    for name, value in whole.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name
    with pytest.raises(ValueError, match="resample_every"):
        TrainSettings(resample_every=0)


def test_a_short_batchtopk_run_saves_a_threshold_that_keeps_k_latents_on_held_out_data(tmp_path):
    """The inference threshold is estimated from the first step (an EMA over the last tenth of a
    short run): 40 steps leave it nonzero and the saved autoencoder fires about k latents on data
    it never saw (before, runs under 1000 steps saved 0: a plain ReLU)."""
    settings = TrainSettings(**{**SETTINGS.__dict__, "arch": "batchtopk", "k": 4, "train_tokens": 16 * 40,
                                "warmup_steps": 1000})  # the default: the old rule waited for step 1000
    sae = SparseAutoencoder(12, 48, "batchtopk", 4, 3, seed=0)
    Trainer(sae, ShuffleBuffer(Chunks(0), 16, 64, seed=0), settings).run(progress=False)
    assert (sae.threshold > 0).all()
    save_sae(sae, tmp_path / "sae", "tiny", 1, "o_proj input", 64)
    loaded, _ = load_sae(tmp_path / "sae")
    held_out = torch.cat([Chunks(7).chunk(i) for i in range(6)])  # another source's activations
    l0 = (loaded.encode(held_out) > 0).sum(1).double().mean().item()
    assert abs(l0 - 4) <= 1.0, l0
