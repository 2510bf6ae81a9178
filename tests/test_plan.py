"""Plans: JSON round trip and clear errors for plans that do not fit."""

import json

import pytest
from conftest import tiny_llama

from headlab.surgeon import HeadScale, ModelShape, Plan, PlanError, attach, model_shape


def test_plan_round_trips_through_json(tmp_path):
    shape = ModelShape(n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64)
    plan = Plan([HeadScale(2, (0, 8), 0.0), HeadScale(29, (4,), 1.5)], model="smollm2-135m", shape=shape)
    path = plan.save(tmp_path / "plan.json")
    loaded = Plan.load(path)
    assert loaded == plan
    assert json.loads(path.read_text())["edits"][0] == {"kind": "head_scale", "layer": 2, "heads": [0, 8], "scale": 0.0}


@pytest.mark.parametrize(
    "edit, message",
    [
        (HeadScale(0, (12,), 0.0), r"head\(s\) \[12\].*0\.\.8"),
        (HeadScale(3, (0,), 0.0), r"layer 3.*0\.\.2"),
        (HeadScale(-1, (0,), 0.0), r"layer -1"),
    ],
)
def test_out_of_range_edits_raise_clear_errors(edit, message):
    model = tiny_llama("gqa")
    with pytest.raises(PlanError, match=message):
        with attach(model, Plan([edit])):
            pass


def test_empty_or_repeated_heads_are_refused():
    with pytest.raises(PlanError, match="no heads"):
        HeadScale(0, (), 0.0)
    with pytest.raises(PlanError, match="repeats"):
        HeadScale(0, (1, 1), 0.0)


def test_unknown_edit_kind_and_unknown_fields_are_refused():
    base = {"format": "headlab-plan/1", "model": None, "shape": None}
    with pytest.raises(PlanError, match="unknown edit kind 'sharpen'"):
        Plan.from_dict({**base, "edits": [{"kind": "sharpen", "layer": 0, "heads": [0]}]})
    with pytest.raises(PlanError, match="unknown field"):
        Plan.from_dict({**base, "edits": [{"kind": "head_scale", "layer": 0, "heads": [0], "beta": 2}]})


def test_plan_for_another_model_shape_is_refused():
    model = tiny_llama("gqa")
    other = ModelShape(n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64)
    plan = Plan([HeadScale(0, (0,), 0.0)], model="smollm2-135m", shape=other)
    with pytest.raises(PlanError, match="made for a model of shape"):
        with attach(model, plan):
            pass
    assert model_shape(model) == ModelShape(3, 9, 3, 6)


def test_wrong_file_is_refused(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(PlanError, match="cannot read plan"):
        Plan.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"edits": []}')
    with pytest.raises(PlanError, match="not a headlab plan"):
        Plan.load(tmp_path / "y.json")
