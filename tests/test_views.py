"""Attention views: pooling, encoding, the data gathered through the hook, figure objects and
escaping (the browser test is in test_view_browser.py)."""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import eager_maps, tiny_llama
from headlab.probes.figures import colour_lut, colourise, plotly_file_name, png_image, saturation_bound
from headlab.probes.views.figure import view
from headlab.probes.scorers.record import record_attention
from headlab.probes.views.data import (PooledMaps, decode_maps, encode_maps, gather_view, map_levels, pool_block,
                                       view_data_from_record)
from headlab.probes.views.page import page_payload, write_view
from headlab.core.escaping import script_json
from headlab.surgeon import Calibrate, HeadScale, Plan

HOSTILE = ["<script>window.__pwned=1</script>", '"><img src=x onerror="window.__pwned=2">']


class HostileTokenizer:
    """Decodes ids 5 and 6 to markup; every other id to ``t<id>``."""

    def decode(self, ids):
        return {5: HOSTILE[0], 6: HOSTILE[1]}.get(ids[0], f"t{ids[0]}")


def hostile_ids(n: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(7, 90, (1, n), generator=torch.Generator().manual_seed(seed))
    ids[0, 3], ids[0, 4] = 5, 6
    return ids


def test_pooling_is_the_block_mean_and_coarsens_exactly():
    maps = torch.rand(2, 11, 11)
    pooled = PooledMaps.from_maps(maps, 3)
    for h in range(2):
        for i in range(4):
            for j in range(4):
                cell = maps[h, 3 * i:3 * i + 3, 3 * j:3 * j + 3]
                assert pooled.means()[h, i, j] == pytest.approx(cell.mean().item(), rel=1e-6)
    coarse = pooled.coarser(2)
    direct = PooledMaps.from_maps(maps, 6)
    assert coarse.block == 6
    torch.testing.assert_close(coarse.means(), direct.means())


def test_pool_block_switches_to_blocks_beyond_token_cells():
    assert pool_block(512) == 1
    assert pool_block(513) == 2  # beyond 512 tokens always pooled, drawn as an image
    assert pool_block(4096) == 4  # 1024 blocks per side
    assert pool_block(5000) == 5


def test_encoded_maps_decode_within_half_a_square_root_step():
    gen = torch.Generator().manual_seed(0)
    causal = [torch.tril(torch.rand(37, 37, generator=gen)) ** 4 for _ in range(3)]
    encoded = encode_maps(causal, 11)
    assert (encoded["side"], encoded["layout"], encoded["levels"]) == (37, "lower", 11)
    for original, decoded in zip(causal, decode_maps(encoded)):
        vmax = float(original.max())
        error = ((decoded / vmax).sqrt() - (original / vmax).sqrt()).abs().max()
        assert error <= 0.5 / 11 + 1e-6  # half a step of sqrt(w / w_max); w_max kept to 6 digits
        assert not decoded.triu(1).any()
    full = encode_maps([torch.rand(5, 5, generator=gen), torch.zeros(5, 5)], 8)
    assert full["layout"] == "full"  # a map with weight above the diagonal keeps every cell
    assert decode_maps(full)[1].abs().max() == 0
    assert (map_levels(96), map_levels(256), map_levels(10), map_levels(10**6)) == (9, 16, 8, 255)


def read_png(data: bytes) -> np.ndarray:
    """A minimal PNG reader (8-bit palette, filter 0), checking signature and CRCs: ``[h, w, 3]`` colours."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 3)
    palette = np.frombuffer(chunks[b"PLTE"], np.uint8).reshape(-1, 3)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + width)
    assert (raw[:, 0] == 0).all()
    return palette[raw[:, 1:]]


def test_png_writer_round_trips_pixels():
    palette = np.random.default_rng(0).integers(0, 256, (256, 3), dtype=np.uint8)
    indices = np.random.default_rng(1).integers(0, 256, (5, 7), dtype=np.uint8)
    np.testing.assert_array_equal(read_png(png_image(indices, palette)), palette[indices])


def test_saturation_bound_is_the_quantile_of_nonzero_weights():
    values = torch.zeros(20, 20)
    values[:, 0] = 1.0  # a sink column
    values[1:, 1] = torch.arange(1, 20) / 100
    # 39 nonzero weights sorted: 0.01 .. 0.19, then twenty 1.0; floor(0.995 * 39) = 38 is the last: 1.0
    assert saturation_bound(values) == 1.0
    values[:, 0] = 0.0
    assert saturation_bound(values) == pytest.approx(0.19)
    assert saturation_bound(torch.zeros(3, 3)) == 1.0


def test_colourise_maps_zero_to_white_end_and_max_to_dark_end():
    rgb = colourise(torch.tensor([[0.0, 0.5, 1.0]]))
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].sum() > rgb[0, 1].sum() > rgb[0, 2].sum()  # Blues: light to dark
    diff = colourise(torch.tensor([[-1.0, 0.0, 1.0]]), diverging=True)
    assert diff[0, 0, 2] > diff[0, 0, 0] and diff[0, 2, 0] > diff[0, 2, 2]  # blue negative, red positive
    saturated = colourise(torch.tensor([[0.25, 0.5, 1.0]]), bound=0.5)
    np.testing.assert_array_equal(saturated[0, 1], saturated[0, 2])  # at and above the bound: the darkest colour
    np.testing.assert_array_equal(saturated[0, 2], colour_lut("Blues")[255])


def test_gathered_maps_equal_eager_attention():
    model = tiny_llama("gqa", layers=3)
    ids = hostile_ids(21)
    data = gather_view(model, HostileTokenizer(), ids, "tiny", progress=False)
    reference = eager_maps(model, input_ids=ids)
    assert data.block == 1 and data.tokens[3] == HOSTILE[0]
    for layer in range(3):
        for head in range(9):
            torch.testing.assert_close(data.pooled(layer, head), reference[layer][0, head], atol=1e-5, rtol=1e-4)
    prev = data.scores["previous_token"]
    expected = torch.stack([reference[l][0, :, torch.arange(1, 21), torch.arange(20)].mean(-1) for l in range(3)])
    torch.testing.assert_close(prev, expected, atol=1e-5, rtol=1e-4)


def test_gathered_plan_maps_equal_the_recorded_plan():
    model = tiny_llama("mha", layers=4)
    ids = hostile_ids(600, seed=2)
    plan = Plan([Calibrate(layer=2, heads=(0, 3), relative_c=2.0, drop_first="none")])
    data = gather_view(model, HostileTokenizer(), ids, "tiny", layers=[1, 2], plan=plan, progress=False)
    assert data.block == 2 and data.pooled(2, 0).shape == (300, 300)
    after = record_attention(model, ids, layers=[2], plan=plan)
    before = record_attention(model, ids, layers=[2])
    for head in (0, 1, 3):
        torch.testing.assert_close(data.pooled(2, head, compare=True),
                                   PooledMaps.from_maps(after.maps[0, head:head + 1], 2).means()[0])
        torch.testing.assert_close(data.pooled(2, head), PooledMaps.from_maps(before.maps[0, head:head + 1], 2).means()[0])
    assert not torch.allclose(data.pooled(2, 0), data.pooled(2, 0, compare=True))
    torch.testing.assert_close(data.pooled(2, 1), data.pooled(2, 1, compare=True))  # unedited head
    assert data.scores["entropy"][0].isnan().all() and not data.scores["entropy"][1].isnan().any()
    with pytest.raises(KeyError):
        data.pooled(0, 0)


def test_payload_cap_coarsens_pooling():
    model = tiny_llama("mqa", layers=2)
    ids = hostile_ids(700, seed=3)
    roomy = gather_view(model, HostileTokenizer(), ids, "tiny", progress=False)
    tight = gather_view(model, HostileTokenizer(), ids, "tiny", payload_bytes=10_000, progress=False)
    assert roomy.block == 2
    assert tight.block > roomy.block
    encoded = len(encode_maps(list(tight.before.values()), map_levels(700))["data"])
    assert encoded <= 10_000 * 1.5  # estimated from a sample of heads
    assert tight.pooled(1, 0).shape[-1] == -(-700 // tight.block)


def test_bad_layer_is_refused():
    model = tiny_llama("gqa", layers=3)
    with pytest.raises(ValueError, match="layers 0..2"):
        gather_view(model, HostileTokenizer(), hostile_ids(9), "tiny", layers=[3], progress=False)


def test_head_figure_for_tokens_images_and_comparison():
    model = tiny_llama("gqa", layers=3)
    plan = Plan([HeadScale(layer=1, heads=(2,), scale=0.0), Calibrate(layer=2, heads=(4,), relative_c=2.0, drop_first="none")])
    short = gather_view(model, HostileTokenizer(), hostile_ids(12), "tiny", plan=plan, progress=False)
    fig = view(short, 2, 4)
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 3  # before, after, difference
    assert heatmaps[0].x[3] == "3: &lt;script&gt;window.__pwned=1&lt;/script&gt;"
    np.testing.assert_allclose(np.array(heatmaps[2].z), np.array(heatmaps[1].z) - np.array(heatmaps[0].z), atol=2e-5)
    assert [h.colorbar.title.text for h in heatmaps] == ["attention weight", "attention weight", "after − before"]
    assert heatmaps[0].zmax == saturation_bound(short.pooled(2, 4))
    assert fig.layout.yaxis.autorange == "reversed"

    long = gather_view(model, HostileTokenizer(), hostile_ids(530), "tiny", progress=False)
    fig = view(long, 2, 0)
    assert [t.type for t in fig.data] == ["image", "scatter"]  # the image and the trace carrying its colour bar
    assert fig.data[0].source.startswith("data:image/png;base64,")
    assert fig.data[1].marker.colorbar.title.text == "mean attention weight per block"
    assert fig.data[1].marker.cmax == saturation_bound(long.pooled(2, 0))
    assert "2 tokens per block" in fig.layout.xaxis.title.text
    with pytest.raises(ValueError, match="both layer and head"):
        view(long, layer=2)


def test_overview_shows_scores_of_viewed_heads_only():
    model = tiny_llama("gqa", layers=3)
    record = record_attention(model, hostile_ids(15), HostileTokenizer(), layers=[0, 2])
    fig = view(record, score="sink_first_token")
    z = np.array(fig.data[0].z, dtype=float)
    assert z.shape == (3, 9)
    assert np.isnan(z[1]).all() and not np.isnan(z[0]).any()
    with pytest.raises(ValueError, match="unknown score"):
        view(record, score="retrieval")


def test_page_json_cannot_break_out_of_its_script():
    model = tiny_llama("gqa", layers=2)
    data = view_data_from_record(record_attention(model, hostile_ids(10), HostileTokenizer()))
    text = script_json(page_payload(data))
    assert "<" not in text and ">" not in text
    assert json.loads(text)["tokens"][3] == HOSTILE[0]


def test_written_page_holds_no_raw_markup_from_tokens(tmp_path):
    model = tiny_llama("gqa", layers=2)
    data = gather_view(model, HostileTokenizer(), hostile_ids(10), "tiny<b>", progress=False)
    path = write_view(data, tmp_path / "view.html", plotlyjs="cdn")
    page = path.read_text(encoding="utf-8")
    assert "<img src=x" not in page and "<script>window" not in page and "tiny<b>" not in page
    assert "tiny&lt;b&gt;" in page
    with pytest.raises(ValueError, match="not in this view"):
        write_view(data, tmp_path / "other.html", head=(5, 0))


@pytest.mark.real_model
def test_a_96_token_view_of_smollm2_weighs_under_300_kb_beside_the_shared_plotly(smollm2, tmp_path):
    model, tokenizer = smollm2
    text = Path(__file__).read_text()  # real text of a fixed content: this file
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :96]
    data = gather_view(model, tokenizer, ids, "smollm2-135m", progress=False)
    assert (data.block, len(data.before)) == (1, 30 * 9)
    page = write_view(data, tmp_path / "view.html")
    assert page.stat().st_size <= 300_000
    assert plotly_file_name() in page.read_text() and (tmp_path / plotly_file_name()).is_file()
