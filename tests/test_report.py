"""The report folder, the CLI, and escaping of hostile token strings."""

import csv
import json
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import torch
from bounds import U
from conftest import CharTokenizer, tiny_llama

from headlab.core.text import TextWindows
from headlab.cli import main
from headlab.probes import ReportSettings, record_attention, write_report


HOSTILE = '<script>window.hacked=1</script>"><img src=x onerror=alert(1)> ' * 40


def test_report_folder_on_a_tiny_model(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(HOSTILE)
    settings = ReportSettings(text=TextWindows(windows=3, tokens=24, text_path=str(text)), seed=1, n_views=2,
                              families=("induction", "gradient"))
    report = write_report(tiny_llama("gqa"), CharTokenizer(), "tiny-gqa", tmp_path / "out", settings, progress=False)
    page = report.read_text()
    # character tokens: every '<' of the text reaches the page as an escaped label, never as markup
    assert "<script>window" not in page and not re.search(r"<img src=x", page)
    data = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert (data["n_layers"], data["n_heads"], data["n_kv_heads"], data["complete"]) == (3, 9, 3, True)
    assert set(data["scores"]) == {"sink_first_token", "entropy", "previous_token", "confidence", "sink_hidden",
               "induction",
                                   "duplicate_token", "gradient_importance"}
    assert all(len(s["values"]) == 3 and len(s["values"][0]) == 9 for s in data["scores"].values())
    rows = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert len(rows) == 27 and rows[5]["kv_group"] == "1"
    assert page.count("view-L") >= 2 and "views.html#head=" in page
    views_page = (tmp_path / "out" / "views.html").read_text()
    assert "<script>window" not in views_page and "<img src=x" not in views_page
    # character tokens reach the view as JSON with '<' escaped (its script escapes them again for plotly)
    assert '"\\u003c"' in views_page and '"\\""' in views_page
    # every score section links to its method page, a file of this checkout's documentation
    links = re.findall(r"<p class='method'><a href='(file:[^']+)'>", page)
    assert len(links) == len(data["scores"])
    assert all(Path(urllib.parse.unquote(urllib.parse.urlparse(link).path)).is_file() for link in links)
    assert any(link.endswith("methods/patterns.md") or link.endswith("methods/patterns.html") for link in links)


def test_report_scores_match_a_direct_computation(tmp_path):
    model, tokenizer = tiny_llama("mqa"), CharTokenizer()
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 30)
    settings = ReportSettings(text=TextWindows(windows=1, tokens=20, text_path=str(text)), seed=0, n_views=1,
                              families=())
    write_report(model, tokenizer, "tiny", tmp_path / "out", settings, progress=False)
    data = json.loads((tmp_path / "out" / "scores.json").read_text())
    from headlab.core.text import token_windows

    (ids,) = token_windows(tokenizer, text.read_text(), 1, 20, 0)
    maps = record_attention(model, ids).maps
    prev = maps[..., torch.arange(1, 20), torch.arange(19)].mean(-1)
    assert torch.allclose(torch.tensor(data["scores"]["previous_token"]["values"]), prev, atol=1e-5)


def test_report_adds_sink_context_and_probe_scores(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    labelled = tmp_path / "labels.jsonl"
    labelled.write_text("".join(json.dumps({"text": "ABCDEFGH" + c, "label": c}) + "\n" for c in "PQ" * 5))
    settings = ReportSettings(text=TextWindows(windows=2, tokens=24, text_path=str(text)), seed=0, n_views=1,
                              families=("sinks", "context"), probe_data=str(labelled))
    report = write_report(tiny_llama("gqa"), CharTokenizer(), "tiny", tmp_path / "out", settings, progress=False)
    data = json.loads((tmp_path / "out" / "scores.json").read_text())["scores"]
    assert {"sink_massive", "context_divergence", "probe_accuracy"} <= set(data)
    assert data["sink_massive"]["settings"]["sink_dims"] == []  # a random model has no massive activation
    assert torch.tensor(data["context_divergence"]["values"]).gt(0).all()
    assert data["probe_accuracy"]["settings"]["majority"] == 0.5
    assert "sink_dims" in report.read_text()  # settings shown on the page


def test_report_of_a_converted_model_scores_its_maps_and_skips_what_needs_softmax_layers(tmp_path):
    from test_conversion import converted

    model = converted(layers=(0, 2))
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    settings = ReportSettings(text=TextWindows(windows=2, tokens=20, text_path=str(text)), seed=0, n_views=1,
                              families=("induction", "gradient", "context", "sinks"))
    write_report(model, CharTokenizer(), "tiny-converted", tmp_path / "out", settings, progress=False)
    data = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert "layers 0, 2 converted to linear attention" in data["provenance"]["attention"]
    skipped = data["provenance"]["skipped"]
    assert set(skipped) == {"gradient", "context"} and "converted" in skipped["gradient"]
    from headlab.core.text import token_windows

    windows = token_windows(CharTokenizer(), text.read_text(), 2, 20, 0)
    maps = torch.stack([record_attention(model, ids).maps for ids in windows])  # [window, layer, head, q, k]
    prev = maps[..., torch.arange(1, 20), torch.arange(19)].mean((0, -1))
    got = torch.tensor(data["scores"]["previous_token"]["values"])
    # both means of 2 × 19 map entries in [0, 1], summed in fp32 in different orders
    assert (got - prev).abs().max() <= 2 * 38 * U and got[0].gt(0).all()  # converted layer 0 scored from its maps
    assert {"induction", "sink_massive"} <= set(data["scores"])
    with pytest.raises(ValueError, match="--tokens"):  # maps over the budget: statistics, which converted layers lack
        write_report(model, CharTokenizer(), "tiny-converted", tmp_path / "long",
                     ReportSettings(text=TextWindows(windows=1, tokens=20_000, text_path=str(text)),
                                    families=()), progress=False)
    assert not (tmp_path / "long").exists()


def test_report_rejects_a_bad_probe_file_before_scoring(tmp_path):
    bad = tmp_path / "labels.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="labels.jsonl:1"):
        ReportSettings(probe_data=str(bad))


def test_cli_help_and_errors(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "report" in capsys.readouterr().out
    assert main(["report", "no-such-org/no-such-model", "--out", "/tmp/headlab-never"]) == 2
    assert "smollm2-135m" in capsys.readouterr().err


def test_cli_models_runs_as_a_command():
    out = subprocess.run([sys.executable, "-m", "headlab", "models"], capture_output=True, text=True, check=True).stdout
    assert "smollm2-135m" in out and "minilm-l6" in out


def test_page_only_writes_the_same_pages_without_scoring_and_adds_what_came_since(tmp_path):
    from test_hostile_pages import hostile_curve

    from headlab.probes.report.scoring import rewrite_report_pages
    from headlab.core.files import record_owned

    model, tokenizer, out = tiny_llama("gqa"), CharTokenizer(), tmp_path / "out"
    settings = ReportSettings(text=TextWindows(windows=2, tokens=24), seed=1, n_views=2,
                              families=("induction", "gradient"))
    write_report(model, tokenizer, "tiny-gqa", out, settings, progress=False)
    written = {name: (out / name).read_text() for name in ("report.html", "views.html", "scores.json", "scores.csv")}
    assert "No masking curves in this folder yet" in written["report.html"]
    (out / "views.html").unlink()
    rewrite_report_pages(model, tokenizer, "tiny-gqa", out, n_views=2)
    assert {name: (out / name).read_text() for name in written} == written  # the same pages, the scores untouched
    (out / "validation-induction.json").write_text(json.dumps(hostile_curve("induction")))
    record_owned(out, ["validation-induction.json"])  # as headlab validate leaves it
    rewrite_report_pages(model, tokenizer, "tiny-gqa", out, n_views=2)
    page = (out / "report.html").read_text()
    assert "No masking curves in this folder yet" not in page and "masking-induction" in page
    # every score keeps its method link (scores.json names each score's page)
    assert len(re.findall(r"<p class='method'>", page)) == len(json.loads(written["scores.json"])["scores"])
    assert (out / "scores.json").read_text() == written["scores.json"]


def test_page_only_refuses_what_it_cannot_rewrite(tmp_path, capsys):
    from headlab.probes.report.scoring import rewrite_report_pages
    from headlab.core.errors import HeadlabError

    model, tokenizer, out = tiny_llama("gqa"), CharTokenizer(), tmp_path / "out"
    settings = ReportSettings(text=TextWindows(windows=1, tokens=16), n_views=1, families=())
    write_report(model, tokenizer, "tiny-gqa", out, settings, progress=False)
    with pytest.raises(HeadlabError, match="scores 'tiny-gqa', not 'other'"):
        rewrite_report_pages(model, tokenizer, "other", out)
    data = json.loads((out / "scores.json").read_text())
    (out / "scores.json").write_text(json.dumps({**data, "complete": False}))
    with pytest.raises(HeadlabError, match="not a finished headlab report"):
        rewrite_report_pages(model, tokenizer, "tiny-gqa", out)
    assert main(["report", "smollm2-135m", "--out", str(out), "--page-only", "--tokens", "64", "--needles", "1"]) == 2
    assert "it takes --views, not --tokens, --needles" in capsys.readouterr().err
    assert main(["report", "smollm2-135m", "--out", str(tmp_path / "none"), "--page-only"]) == 2
    assert "holds no scores.json" in capsys.readouterr().err


def test_a_stopped_report_resumes_after_its_finished_families(tmp_path, monkeypatch):
    """Ctrl-C in the second family: started again with the same settings, the report scores neither
    the pattern scores nor the first family again, and writes the scores of an uninterrupted run."""
    import dataclasses

    from headlab.probes.report import scoring as report_module
    from headlab.probes.scorers import families as score_families

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    settings = ReportSettings(text=TextWindows(windows=2, tokens=24, text_path=str(text)), seed=0, n_views=1,
                              families=("sinks", "context", "induction"))
    model, tokenizer = tiny_llama("gqa"), CharTokenizer()
    write_report(model, tokenizer, "tiny", tmp_path / "whole", settings, progress=False)
    families, _ = score_families.requested_families(settings, causal=True)
    first, second = families[0], families[1]
    runs = []

    def counted(family, fail: bool):
        def run(inputs):
            runs.append(family.name)
            if fail:
                raise KeyboardInterrupt
            yield from family.run(inputs)
        return dataclasses.replace(family, run=run)

    monkeypatch.setitem(score_families.SCORE_FAMILIES, first.name, counted(first, False))
    monkeypatch.setitem(score_families.SCORE_FAMILIES, second.name, counted(second, True))
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        write_report(model, tokenizer, "tiny", out, settings, progress=False)
    partial = json.loads((out / "scores.json").read_text())
    assert partial["complete"] is False and partial["partial"]["families_done"] == ["patterns", first.name]
    monkeypatch.setitem(score_families.SCORE_FAMILIES, second.name, counted(second, False))
    monkeypatch.setattr(report_module, "_pattern_pass", lambda *args: pytest.fail("pattern scores scored again"))
    runs.clear()
    write_report(model, tokenizer, "tiny", out, settings, progress=False)
    assert runs == [second.name]
    resumed, whole = (json.loads((folder / "scores.json").read_text()) for folder in (out, tmp_path / "whole"))
    for data in (resumed, whole):
        data["provenance"].pop("written")
    assert resumed == whole
    other = dataclasses.replace(settings, seed=1)  # other settings: scored afresh, not resumed
    (out / "scores.json").write_text(json.dumps(partial))
    monkeypatch.undo()
    write_report(model, tokenizer, "tiny", out, other, progress=False)
    write_report(model, tokenizer, "tiny", tmp_path / "other", other, progress=False)
    afresh, other_whole = (json.loads((folder / "scores.json").read_text())["scores"]
                           for folder in (out, tmp_path / "other"))
    assert afresh == other_whole and afresh != whole["scores"]
