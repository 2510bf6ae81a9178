# %% [markdown]
# # A small SAE on head outputs
#
# A sparse autoencoder on the per-head outputs of one SmolLM2 layer (the input of its output
# projection, TransformerLens `hook_z`), trained for a few thousand tokens on the CPU, then saved in
# SAELens' layout and read for which heads each latent draws on. The command-line equivalent with
# realistic settings is `headlab sae train smollm2-135m --layers 12 --out sae-l12`.

# %%
import tempfile
from pathlib import Path

import torch

from headlab.core.text import TextWindows, load_text, token_windows
from headlab.sae import decoder_head_shares, head_outputs, load_sae, train_sae
from headlab.sae.settings import TrainSettings
from headlab.surgeon import load_model

model, tokenizer = load_model("smollm2-135m")
layer = 12

# %% [markdown]
# ## Training and saving
#
# `train_sae` is what `headlab sae train` runs: about 8,200 activations of 576 values (9 heads × 64) from
# windows of 128 tokens train a TopK autoencoder with 4× expansion and k = 16; it is saved in SAELens'
# layout with its metrics on 4 held-out windows.

# %%
folder = Path(tempfile.mkdtemp()) / "sae"
settings = TrainSettings(arch="topk", k=16, expansion=4, train_tokens=8192, batch_tokens=256, buffer_tokens=2048,
                         init_rows=2048)
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
# norm over the sum of the slices' norms.

# %%
windows = token_windows(tokenizer, load_text(None), 2, 128, seed=1)
x = torch.cat([head_outputs(model, window, layer)[1:] for window in windows])  # [positions, 576], first token dropped
codes = loaded.encode(x)
firing = (codes > 0).float().mean(0)
shares = decoder_head_shares(loaded)  # [latents, heads]
for latent in firing.topk(5).indices.tolist():
    head = int(shares[latent].argmax())
    print(f"latent {latent}: fires on {float(firing[latent]):.1%} of tokens, {float(shares[latent, head]):.0%} "
          f"of its decoder norm on head {head}")
