# %% [markdown]
# # A small SAE on head outputs
#
# A sparse autoencoder on the per-head outputs of one SmolLM2 layer (the input of its output
# projection, TransformerLens `hook_z`), trained for a few thousand tokens on the CPU, then saved in
# SAELens' layout and read for which heads its latents draw on. The command-line equivalent with
# realistic settings is `headlab sae train smollm2-135m --layers 12 --out sae-l12`.

# %%
import tempfile
from pathlib import Path

import torch

from headlab.core.text import TextWindows, load_text, token_windows
from headlab.sae import SparseAutoencoder, decoder_head_shares, head_outputs, load_sae, train_sae
from headlab.sae.settings import TrainSettings
from headlab.surgeon import load_model

model, tokenizer = load_model("smollm2-135m")
layer = 12

# %% [markdown]
# ## Training and saving
#
# `train_sae` is what `headlab sae train` runs: about 8,200 activations of 576 values (9 heads × 64) from
# windows of 128 tokens train a TopK autoencoder with 4× expansion and k = 16 for 128 steps of 64
# tokens; it is saved in SAELens' layout with its metrics on 4 held-out windows. The learning rate, 3e-3,
# is well above the default rule (5e-4 at this size, meant for runs of hundreds of thousands of tokens):
# at the default a run this short leaves the decoder where its random start put it (explained variance
# near 0).

# %%
folder = Path(tempfile.mkdtemp()) / "sae"
settings = TrainSettings(arch="topk", k=16, expansion=4, train_tokens=8192, batch_tokens=64, lr=3e-3,
                         buffer_tokens=2048, init_rows=2048)
metrics = train_sae(model, tokenizer, layer, folder, settings, TextWindows(windows=4, tokens=128),
                    model_spec="smollm2-135m", progress=False)
print({name: round(metrics[name], 3) for name in ("l0", "explained_variance", "dead_fraction")})
loaded, config = load_sae(folder)
print(config["architecture"], config["metadata"]["hook_name"], config["d_sae"])
assert config["d_sae"] == 4 * 576 and config["metadata"]["hook_name"] == f"blocks.{layer}.attn.hook_z"

# %% [markdown]
# ## Which heads a latent draws on
#
# Each decoder row splits into one 64-value slice per head; a latent's share on a head is that slice's
# norm over the sum of the slices' norms, 1/9 each for a latent spread evenly. Among the latents that
# fire on at least 2% of the tokens of two fresh windows, the cell picks the one whose top head holds
# the largest share and prints its shares, then the median top-head share of those latents, each
# beside the same figure for the untrained decoder (the same seed's random start).
#
# At this budget no latent belongs to one head. The chosen latent leans on its head, with about
# twice the even share and more than its random start gave it, but no frequent latent puts half its
# norm on one head, and the typical one is barely less even than a random row. The decoder rows start
# as random directions, whose norm splits evenly over the heads, and 128 steps move them only part of
# the way; published attention-output autoencoders train on hundreds of millions of tokens.

# %%
windows = token_windows(tokenizer, load_text(None), 2, 128, seed=1)
x = torch.cat([head_outputs(model, window, layer)[1:] for window in windows])  # [positions, 576], first token dropped
firing = (loaded.encode(x) > 0).float().mean(0)
shares = decoder_head_shares(loaded)  # [latents, heads]
untrained = decoder_head_shares(SparseAutoencoder(loaded.d_in, loaded.d_sae, "topk", 16, loaded.n_heads,
                                                  loaded.d_head, seed=settings.seed))
frequent = (firing >= 0.02).nonzero().flatten()
top_share = shares[frequent].max(1).values
latent = int(frequent[top_share.argmax()])
head = int(shares[latent].argmax())
uniform = 1 / loaded.n_heads
print(f"latent {latent}: fires on {float(firing[latent]):.1%} of {len(x)} tokens, {float(shares[latent, head]):.2f} "
      f"of its decoder norm on head {head} (untrained {float(untrained[latent, head]):.2f}, even {uniform:.2f})")
print("its shares by head:", [round(value, 2) for value in shares[latent].tolist()])
print(f"{len(frequent)} latents fire on at least 2%; their top head's share: median {float(top_share.median()):.2f} "
      f"(untrained {float(untrained[frequent].max(1).values.median()):.2f}), largest {float(top_share.max()):.2f}")
assert shares[latent, head] > max(1.5 * uniform, untrained[latent, head]) and top_share.max() < 0.5
assert float(top_share.median()) < 2 * uniform
