"""The model families of the family matrix (``test_families.py``): tiny random decoders built from
each family's transformers config, and the README's table of supported families, generated from
this list (``python tests/families.py`` rewrites it; a test checks that it is current).

Every family has 4 layers, 5 query heads of size 6 (so swapped dimensions fail loudly), one KV
head (multi-query) unless it says otherwise, and weights drawn with a larger spread than the
families' initialisers so that attention rows are sharp enough for a wrong mask, window, cap or
sink to show. Families that headlab cannot support name the error and the reason it gives.
"""

from __future__ import annotations

import functools
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

VOCAB = 97
N_LAYERS, N_HEADS, HEAD_DIM = 4, 5, 6
WINDOW = 7  # sliding window, shorter than the matrix's 23-token inputs
COMMON = dict(vocab_size=VOCAB, hidden_size=N_HEADS * HEAD_DIM, intermediate_size=37, num_hidden_layers=N_LAYERS,
              num_attention_heads=N_HEADS, num_key_value_heads=1, head_dim=HEAD_DIM, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
ALTERNATING = ["sliding_attention", "full_attention"] * (N_LAYERS // 2)
MOE = dict(num_experts_per_tok=2)
README = Path(__file__).parents[1] / "README.md"
TABLE_START, TABLE_END = "<!-- --8<-- [start:family-table] -->", "<!-- --8<-- [end:family-table] -->"


@dataclass(frozen=True)
class Family:
    """One transformers ``model_type`` and the config that makes it tiny."""

    name: str
    config: dict = field(default_factory=dict)
    quirks: str = ""  # what the family adds to plain causal attention
    refused: str | None = None  # the start of the error headlab gives, for families it cannot support
    # what a default linear-attention conversion does: the layers it replaces (every full-attention
    # layer), or a phrase of the error that refuses it (test_conversion_families.py)
    conversion: tuple[int, ...] | str = tuple(range(N_LAYERS))
    # whether a mean replacement folds into the weights (the output projection has a bias, or a config
    # switch adds one); where not, `headlab apply` saves the model with its plan (test_saving.py)
    mean_folds: bool = True

    @property
    def kv_heads(self) -> int:
        return self.config.get("num_key_value_heads", COMMON["num_key_value_heads"])


FAMILIES = (
    Family("llama"),
    Family("mistral", dict(sliding_window=WINDOW, num_key_value_heads=5), "sliding window (every layer)",
           conversion="every layer of this model attends through a sliding window", mean_folds=False),
    Family("mixtral", dict(num_local_experts=3, **MOE), "mixture of experts", mean_folds=False),
    Family("qwen2", mean_folds=False),
    Family("qwen2_moe", dict(num_experts=3, moe_intermediate_size=11, shared_expert_intermediate_size=13, **MOE),
           "mixture of experts", mean_folds=False),
    Family("qwen3", quirks="query/key norms"),
    Family("qwen3_moe", dict(num_experts=3, moe_intermediate_size=11, **MOE), "mixture of experts, query/key norms"),
    Family("gemma", dict(num_key_value_heads=5)),
    Family("gemma2", dict(sliding_window=WINDOW, attn_logit_softcapping=2.0, layer_types=ALTERNATING),
           "soft-capped logits, sliding window on alternate layers, eager attention",
           conversion="its attention logits are soft-capped"),
    Family("gemma3_text", dict(sliding_window=WINDOW, layer_types=["sliding_attention"] * 3 + ["full_attention"]),
           "sliding window on 3 of 4 layers, query/key norms", conversion=(3,)),
    Family("gpt_oss", dict(sliding_window=WINDOW, num_local_experts=3, layer_types=ALTERNATING, **MOE),
           "learned attention sinks, sliding window on alternate layers, eager attention",
           conversion="has parameters of its own (sinks"),
    Family("cohere"),
    Family("cohere2", dict(sliding_window=WINDOW, layer_types=ALTERNATING), "sliding window on alternate layers",
           conversion=(1, 3)),  # its full-attention layers, which have no rotary positions
    Family("olmo"),
    Family("olmo2", quirks="query/key norms"),
    Family("granite", quirks="scaled attention and residuals"),
    Family("starcoder2", dict(num_key_value_heads=5)),
    Family("phi", dict(partial_rotary_factor=1.0, num_key_value_heads=5), conversion="PhiAttention has submodules"),
    Family("phi3", conversion="Phi3Attention has submodules", mean_folds=False),
    Family("smollm3", quirks="no rotary positions on every fourth layer"),
    Family("helium", mean_folds=False),
    Family("gpt2", dict(n_embd=N_HEADS * HEAD_DIM, n_layer=N_LAYERS, n_head=N_HEADS, n_positions=128, n_inner=37,
                        num_key_value_heads=N_HEADS),
           "fused qkv projection, learned positions", conversion="under another name than self_attn"),
    Family("gpt_neox", dict(num_key_value_heads=5), "fused qkv projection, partial rotary",
           conversion="under another name than self_attn"),
    Family("opt", dict(ffn_dim=37, word_embed_proj_dim=N_HEADS * HEAD_DIM, num_key_value_heads=5),
           "learned positions", conversion="OPTAttention has submodules"),
    Family("falcon", dict(num_key_value_heads=5), refused="FalconForCausalLM computes attention in its own code",
           conversion="computes attention in its own code"),
    Family("gptj", dict(n_embd=N_HEADS * HEAD_DIM, n_layer=N_LAYERS, n_head=N_HEADS, rotary_dim=4, n_positions=128),
           refused="GPTJForCausalLM computes attention in its own code",
           conversion="computes attention in its own code"),
    Family("stablelm", dict(num_key_value_heads=5), refused="StableLmForCausalLM computes attention in its own code",
           conversion="computes attention in its own code"),
)
BY_NAME = {family.name: family for family in FAMILIES}
SUPPORTED = tuple(family.name for family in FAMILIES if family.refused is None)
REFUSED = tuple(family.name for family in FAMILIES if family.refused is not None)


@functools.cache
def family_model(name: str):
    """The family's tiny model, eval mode, in the attention implementation transformers picks
    for it (built once per test session; tests must leave it as they found it)."""
    import transformers
    from transformers import AutoModelForCausalLM

    family = BY_NAME[name]
    config = {**COMMON, **family.config}
    if name == "falcon":
        config.pop("head_dim")  # derived from hidden_size in Falcon's config
    config = transformers.CONFIG_MAPPING[name](**config)
    torch.manual_seed(0)
    # eager experts: the grouped-matmul kernel needs 16-byte aligned strides, which odd sizes lack
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.dim() >= 2:
                torch.nn.init.normal_(param, std=0.3)
            elif param_name.endswith("sinks"):
                torch.nn.init.normal_(param, std=2.0)
    return model


def output_projection(attention_module) -> torch.nn.Module:
    """The module that receives the per-head outputs ``[..., heads · head_dim]`` of an attention
    module (``o_proj`` and its other names)."""
    for name in ("o_proj", "dense", "c_proj", "out_proj"):
        if hasattr(attention_module, name):
            return getattr(attention_module, name)
    raise LookupError(f"no output projection found on {type(attention_module).__name__}")


CHECKS = ("empty plan exact", "`generate` unchanged", "maps = eager", "statistics = eager", "HeadScale",
          "Calibrate keeps row sums", "cached = recomputed (Steer + Calibrate)",
          "Uniform decode = zeroed query", "Stream = sink + window mask", "head-output tap", "SAE activations")


def family_table() -> str:
    """The README's table of families, from :data:`FAMILIES` (each check is a test of the matrix)."""
    lines = ["| family | what it adds | " + " | ".join(CHECKS) + " | linear-attention conversion | `headlab apply` |",
             "|---|---|" + "---|" * (len(CHECKS) + 2)]
    for family in FAMILIES:
        if family.refused is None:
            cells = [family.quirks or "plain causal attention", *("✓" for _ in CHECKS), _conversion_cell(family),
                     "✓ static edits fold" if family.mean_folds else "✓ scaling folds; mean replacement: model + plan"]
        else:
            cells = [f"refused: “{family.refused}…”", *("—" for _ in CHECKS), "—", "—"]
        lines.append(f"| `{family.name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _conversion_cell(family: Family) -> str:
    if isinstance(family.conversion, str):
        return f"refused: “…{family.conversion}…”"
    if len(family.conversion) == N_LAYERS:
        return "✓ every layer"
    word = "layer" if len(family.conversion) == 1 else "layers"
    return f"✓ {word} " + ", ".join(map(str, family.conversion)) + " (full attention)"


def readme_table() -> str:
    """The family table the README holds now (between its markers)."""
    text = README.read_text(encoding="utf-8")
    match = re.search(re.escape(TABLE_START) + r"\n(.*?)\n" + re.escape(TABLE_END), text, re.S)
    return match.group(1) if match else ""


def write_readme_table() -> None:
    """Rewrite the table between the README's markers."""
    text = README.read_text(encoding="utf-8")
    if TABLE_START not in text:
        raise SystemExit(f"README.md has no {TABLE_START} marker")
    before, rest = text.split(TABLE_START, 1)
    _, after = rest.split(TABLE_END, 1)
    README.write_text(f"{before}{TABLE_START}\n{family_table()}\n{TABLE_END}{after}", encoding="utf-8")


if __name__ == "__main__":
    write_readme_table()
    sys.stdout.write(family_table() + "\n")


@contextmanager
def patched_eager(model, wrap):
    """The model on its family's eager attention, with ``eager_attention_forward`` replaced by
    ``wrap(original)`` for the block."""
    from headlab.surgeon.sites import attention_modules

    module = sys.modules[type(attention_modules(model)[0]).__module__]
    original = module.eager_attention_forward
    previous = model.config._attn_implementation
    module.eager_attention_forward = wrap(original)
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        module.eager_attention_forward = original
        model.set_attn_implementation(previous)
