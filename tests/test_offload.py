"""A model larger than its memory budget: ``load_model(..., max_memory=...)`` leaves layers on disk
(accelerate reads each during its forward). Taps, edits, the report and SAE activation reads
give exactly what the model in memory gives."""

import json

import torch
from conftest import tiny_llama
from test_report import CharTokenizer

from headlab.core.text import TextWindows
from headlab.probes import ReportSettings, write_report
from headlab.sae.activations import head_outputs
from headlab.surgeon import Calibrate, HeadScale, Plan, Taps, attach, load_model


def test_taps_edits_and_activations_are_the_same_with_layers_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    model = tiny_llama("gqa", layers=4)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    spread = _load_spread(folder)
    assert "disk" in set(spread.hf_device_map.values()) and "cpu" in set(spread.hf_device_map.values())
    assert spread.model.layers[3].self_attn.q_proj.weight.device.type == "meta"  # not in memory between forwards
    ids = torch.randint(1, 90, (2, 17), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    taps = Taps(attention={1: None, 3: (0, 4)}, head_outputs=[2, 3], stats={3: None}, stats_topk=2)
    plan = Plan([HeadScale(1, (2,), 0.0), Calibrate(3, (0, 1, 5), beta=0.3)])
    results = []
    for candidate in (model, spread):
        with torch.no_grad(), attach(candidate, plan, taps) as session:
            logits = candidate(input_ids=ids, attention_mask=mask).logits
        rec = session.recording
        results.append((logits, rec.attention_map(1), rec.attention_map(3), rec.head_output(2), rec.head_output(3),
                        rec.stats[3][0].entropy, rec.stats[3][0].topk_index))
    for in_memory, on_disk in zip(*results):
        assert torch.equal(in_memory, on_disk)
    assert torch.equal(head_outputs(model, ids[:1], 2), head_outputs(spread, ids[:1], 2))


def test_the_report_is_the_same_with_layers_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    model = tiny_llama("mqa", layers=4)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    settings = ReportSettings(text=TextWindows(windows=2, tokens=24, text_path=str(text)), seed=1, n_views=1,
                              families=("induction", "gradient", "context"))
    scores = []
    for name, candidate in (("memory", model), ("disk", _load_spread(folder))):
        write_report(candidate, CharTokenizer(), "tiny", tmp_path / name, settings, progress=False)
        scores.append(json.loads((tmp_path / name / "scores.json").read_text())["scores"])
    assert set(scores[0]) == set(scores[1])
    for name in scores[0]:
        assert scores[0][name]["values"] == scores[1][name]["values"], name


def _load_spread(folder):
    """The model at ``folder`` with a memory budget of half its weights."""
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    model, _ = load_model(folder, max_memory=f"{size // 2 // 1000}KB")
    return model
