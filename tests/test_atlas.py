"""The head atlas: descriptors of hand-set maps, planted head types recovered as clusters, a model
compared with itself, the command and its page."""

import pytest
import torch
from bounds import U
from conftest import tiny_llama

from headlab.probes.atlas.build import (N_LOCALITY, Descriptors, build_atlas, describe_heads, distance_bins,
                                        map_descriptors, pattern_name)

N = 64


def previous_token_map(n=N) -> torch.Tensor:
    maps = torch.zeros(n, n)
    maps[0, 0] = 1
    maps[torch.arange(1, n), torch.arange(n - 1)] = 1
    return maps


def sink_map(n=N) -> torch.Tensor:
    maps = torch.zeros(n, n)
    maps[:, 0] = 1
    return maps


def uniform_map(n=N) -> torch.Tensor:
    return torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]


def test_distance_bins_are_log_spaced():
    bins = distance_bins(1, 2000, 1999)[0].flip(0)  # distances 0 .. 1999
    assert bins[:9].tolist() == [0, 1, 2, 2, 3, 3, 3, 3, 4] and int(bins[1023]) == 10 and int(bins[1999]) == 11


def test_the_descriptor_of_a_previous_token_head_and_of_a_sink_head():
    d = map_descriptors(torch.stack([previous_token_map(), sink_map()]), causal=True)
    prev, sink = 0, 1
    expected = torch.zeros(N_LOCALITY)
    expected[0], expected[1] = 1 / N, (N - 1) / N  # row 0 on itself, every other row one back
    # each bin: a fp32 sum of at most N² cells in [0, 1] (at most N in all), divided by N
    assert (d["locality"][prev] - expected).abs().max() <= N**2 * U
    assert d["first"][prev] == 2 / N and d["first"][sink] == 1.0  # sums of exact 0s and 1s
    assert d["hidden_sinks"][sink] == 0.0, "the first token is never a hidden sink"
    assert d["entropy"][prev, 0] == 1.0 and d["entropy"][sink, 0] == 1.0  # bin counts over row counts
    # pooled rows are distributions: 32 quotients (each within u) summed in fp32
    assert (d["pooled"].sum(-1) - 1).abs().max() <= 2 * 32 * U
    assert d["pooled"][sink][:, 0].min() == 1.0 and d["pooled"][prev].diagonal().min() > 0.4
    u = map_descriptors(uniform_map()[None], causal=True)
    assert u["entropy"][0, -1] == 1.0, "a uniform row has the highest normalised entropy"
    assert pattern_name(d["locality"][prev], float(d["first"][prev]), 0.0) == "previous-token"
    assert pattern_name(d["locality"][sink], 1.0, 0.0) == "sink"
    assert pattern_name(u["locality"][0], float(u["first"][0]), 0.0) == "broad"


def planted(noise_seed=0, per_type=12) -> tuple[Descriptors, list[int]]:
    """Descriptors of 3 layers x 12 heads; layer t's heads are of type t (previous-token, sink,
    uniform), each map with its own noise."""
    gen = torch.Generator().manual_seed(noise_seed)
    parts = {name: [] for name in ("locality", "first", "hidden_sinks", "entropy", "pooled")}
    for make in (previous_token_map, sink_map, uniform_map):
        maps = make()[None].repeat(per_type, 1, 1) + 0.05 * torch.rand(per_type, N, N, generator=gen)
        maps = torch.tril(maps)
        maps = maps / maps.sum(-1, keepdim=True)
        for name, value in map_descriptors(maps, causal=True).items():
            parts[name].append(value)
    return Descriptors(**{name: torch.stack(v) for name, v in parts.items()}), [0] * per_type + [1] * per_type + [2] * per_type


def test_planted_head_types_come_back_as_named_clusters():
    descriptors, types = planted()
    atlas = build_atlas([descriptors], k=3)
    clusters = atlas.clusters.tolist()
    for t in range(3):
        assert len({clusters[i] for i, ty in enumerate(types) if ty == t}) == 1, "one cluster per planted type"
    assert len(set(clusters)) == 3
    names = {atlas.names[clusters[types.index(t)]] for t in range(3)}
    assert names == {"previous-token", "sink", "broad"}
    for method in ("autoencoder", "pca", "tsne"):
        assert atlas.points[method].shape == (36, 2) and torch.isfinite(atlas.points[method]).all()


def test_a_model_compared_with_itself_does_not_move():
    model = tiny_llama("gqa", layers=3)
    windows = [torch.randint(1, 97, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    d = describe_heads(model, windows, progress=False)
    n = 24  # each map row sums to one within (n + 4)·u; the bins' fp32 sum over n² cells adds n²·u
    assert d.first.shape == (3, 9) and (d.locality.sum(-1) - 1).abs().max() <= (n + 4 + n**2) * U
    atlas = build_atlas([d, d], k=3)
    assert torch.equal(atlas.displacement(), torch.zeros(3, 9))


@pytest.mark.slow
def test_atlas_page_hovers_clicks_through_and_runs_no_hostile_string(tmp_path):
    from test_hostile_pages import PAYLOADS, assert_inert, load
    from test_view_browser import CHROMIUM

    if CHROMIUM is None:
        pytest.skip("no Chromium on PATH (CI installs it)")
    from playwright.sync_api import sync_playwright

    from headlab.probes.atlas.build import atlas_document
    from headlab.probes.atlas.page import write_atlas_page
    from headlab.core.head_scores import HeadScores

    descriptors, _ = planted(per_type=4)
    other, _ = planted(noise_seed=1, per_type=4)
    values = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    scores = {PAYLOADS[2]: HeadScores(PAYLOADS[2], values, torch.ones_like(values), "m")}
    atlas = build_atlas([descriptors, other], [scores, {}], k=3)
    doc = atlas_document(atlas, [PAYLOADS[0], PAYLOADS[1]])
    doc["points"]["autoencoder"] = [[i % 6, i // 6] for i in range(24)]  # apart on a grid: one point per spot
    (tmp_path / "views.html").write_text("<!doctype html><title>views</title>")
    path = write_atlas_page(doc, tmp_path / "atlas.html")
    index = 7  # the first model's layer 1, head 3
    _, layer, head = doc["heads"][index]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page, errors = load(browser, path)
        assert_inert(page, errors)
        assert PAYLOADS[0] in page.title()
        assert page.locator("table td", has_text=PAYLOADS[0]).count() >= 1  # example heads name their model
        assert page.locator("table th", has_text=PAYLOADS[2]).count() == 1  # the hostile score's column
        x, y = page.evaluate("""(() => { const gd = document.querySelectorAll('.plotly-graph-div')[0];
            const box = gd.getBoundingClientRect(), xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
            const p = gd.data.find(t => t.customdata && t.customdata.includes(INDEX)), i = p.customdata.indexOf(INDEX);
            return [box.left + xa._offset + xa.l2p(p.x[i]), box.top + ya._offset + ya.l2p(p.y[i])]; })()
            """.replace("INDEX", str(index)))
        page.mouse.move(x - 4, y - 4)
        page.mouse.move(x, y)
        page.wait_for_function(f"document.getElementById('atlas-pooled').dataset.shown === '{index}'")
        title = page.evaluate("document.getElementById('atlas-pooled').layout.title.text")
        assert f"layer {layer}, head {head}" in title and "<img" not in title
        assert_inert(page, errors)
        page.mouse.click(x, y)
        page.wait_for_url(f"**/views.html#head={layer}.{head}")
        assert errors == []
        browser.close()


@pytest.mark.slow
@pytest.mark.real_model
def test_atlas_command_compares_smollm2_before_and_after_a_plan(tmp_path, capsys):
    import json

    from headlab.cli import main
    from headlab.surgeon import HeadScale, Plan

    Plan([HeadScale(10, (0, 1, 2), scale=0.0)]).save(tmp_path / "plan.json")
    status = main(["atlas", "smollm2-135m", "--compare", str(tmp_path / "plan.json"), "--windows", "1", "--tokens",
                   "48", "--clusters", "4", "--out", str(tmp_path / "atlas")])
    assert status == 0
    doc = json.loads((tmp_path / "atlas" / "atlas.json").read_text())
    moved = torch.tensor(doc["displacement"])
    assert moved.shape == (30, 9)
    assert torch.equal(moved[:11], torch.zeros(11, 9)), "a head at or below the edited layer keeps its pattern"
    assert moved[11:].max() > 0, "heads above the zeroed heads change"
    assert len(doc["models"]) == 2 and sum(row["size"] for row in doc["cluster_table"]) == 540
    assert (tmp_path / "atlas" / "atlas.html").read_text().count("plotly-graph-div") >= 4
    printed = capsys.readouterr().out
    for row in doc["cluster_table"]:  # each example head says whose it is: before or after the plan
        s, l, h = row["examples"][0]
        assert f"{row['name']}: {row['size']} heads, e.g. L{l}.H{h} ({doc['models'][s]})" in printed


def test_converted_layers_are_described_by_their_converted_weights():
    from headlab.probes.atlas.build import map_descriptors
    from headlab.surgeon.conversion.converted import convert
    from headlab.surgeon.conversion.settings import LinearSettings

    model = convert(tiny_llama("gqa", layers=3), LinearSettings(window=4, layers=(1,)))
    ids = torch.randint(1, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    described = describe_heads(model, [ids], progress=False)
    layer = model.model.layers[1].self_attn
    captured = {}
    handle = layer.register_forward_pre_hook(
        lambda m, a, k: captured.update(maps=m.attention_weights_of(a[0] if a else k["hidden_states"],
                                                                    k.get("position_embeddings"))), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    expected = map_descriptors(captured["maps"][0].float(), causal=True)
    assert torch.equal(described.locality[1], expected["locality"])  # the same weights, the same reduction
    unconverted = describe_heads(tiny_llama("gqa", layers=3), [ids], progress=False)
    assert torch.equal(described.locality[0], unconverted.locality[0])  # layer 0 is untouched
    assert not torch.allclose(described.locality[1], unconverted.locality[1])
