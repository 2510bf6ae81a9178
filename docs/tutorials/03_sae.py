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

from headlab.core.text import load_text, token_windows
from headlab.sae import (ModelActivations, ShuffleBuffer, SparseAutoencoder, Trainer, decoder_head_shares,
                         load_sae, save_sae)
from headlab.sae.settings import TrainSettings
from headlab.surgeon import load_model, model_shape

torch.manual_seed(0)
model, tokenizer = load_model("smollm2-135m")
shape = model_shape(model)
layer, d_in = 12, shape.n_heads * shape.head_dim

# %% [markdown]
# ## Training
#
# 24 windows of 128 tokens give about 3000 activations of 576 values (9 heads × 64); a TopK autoencoder
# with 4× expansion and k = 16 trains on 8192 of them.

# %%
windows = token_windows(tokenizer, load_text(None), 24, 128, seed=0)
settings = TrainSettings(arch="topk", k=16, expansion=4, train_tokens=8192, batch_tokens=256, buffer_tokens=2048,
                         init_rows=2048)
source = ModelActivations(model, windows, layer)
sae = SparseAutoencoder(d_in, 4 * d_in, "topk", 16, shape.n_heads, shape.head_dim, seed=0)
trainer = Trainer(sae, ShuffleBuffer(source, settings.batch_size, settings.buffer_tokens, seed=0), settings)
trainer.run(progress=False)
print(f"{sae.d_sae} latents; last logged step:", trainer.history[-1])

# %% [markdown]
# ## Saving in SAELens' layout

# %%
folder = Path(tempfile.mkdtemp()) / "sae"
save_sae(sae, folder, "HuggingFaceTB/SmolLM2-135M-Instruct", layer, f"model.layers.{layer}.self_attn.o_proj", 128)
loaded, config = load_sae(folder)
print(config["architecture"], config["metadata"]["hook_name"], config["d_sae"])

# %% [markdown]
# ## Which heads a latent draws on
#
# Each decoder row splits into one 64-value slice per head; a latent's share on a head is that slice's
# norm over the sum of the slices' norms.

# %%
x = torch.cat([source.chunk(i) for i in range(2)])
codes = loaded.encode(x)
firing = (codes > 0).float().mean(0)
shares = decoder_head_shares(loaded)  # [latents, heads]
for latent in firing.topk(5).indices.tolist():
    head = int(shares[latent].argmax())
    print(f"latent {latent}: fires on {float(firing[latent]):.1%} of tokens, {float(shares[latent, head]):.0%} "
          f"of its decoder norm on head {head}")
