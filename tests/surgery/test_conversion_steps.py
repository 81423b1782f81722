"""convert's three steps on their own (analyse -> plan -> apply), the width plan, the record's round trip, and
convert's options written once (ConvertOptions; convert's keywords and KapConfig's fields follow it)."""

import copy
import dataclasses
import inspect
import json

import torch
from torch import nn

import kapify
from kapify.layers import ChannelGrid
from kapify.surgery.channels import analyze_channels
from kapify.surgery.config import KapConfig, LayerRecord
from kapify.surgery.conversion_plan import ConvertOptions
from kapify.surgery.convert import analyse, apply_plan, plan_conversion, replay
from kapify.surgery.rewiden import WIDTH_RULES
from kapify.surgery.width_plan import plan_widths
from tests.helpers import assert_unchanged, state_snapshot

X = torch.rand(2, 3, 8, 8)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 20, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 5),
    ).eval()  # fmt: skip


def test_plan_widths_gives_each_free_group_its_square_and_keeps_the_old_channels_first():
    graph = analyze_channels(_net(), X)
    first, second = graph.output_layout("0")[0], graph.output_layout("3")[0]
    plan = plan_widths(graph, WIDTH_RULES["square"](), function_preserving=True, convs=["0", "3"])
    assert plan.widths[first] == 16 and plan.widths[second] == 25  # 12 -> 4x4, 20 -> 5x5
    assert sorted(plan.fixed.values()) == ["model input", "model output"] and plan.merged == {}
    assert torch.equal(plan.index[first], torch.arange(12)) and torch.equal(plan.index[second], torch.arange(20))


def test_plan_conversion_reads_the_analysed_model_and_plans_each_conv():
    net = _net()
    options = ConvertOptions.checked(k=3, sigma=0.1)
    found = analyse(net, options, X[:1], ())
    before = state_snapshot(found.model)
    plan = plan_conversion(net, found, options, X[:1])
    assert_unchanged(found.model, before)  # planning changes nothing
    assert plan.entry == "0" and plan.options == options
    assert [(p.name, p.sheet, p.spare) for p in plan.layers] == [
        ("0", ChannelGrid(4, 4), False),
        ("3", ChannelGrid(5, 5), False),
    ]
    first = plan.layers[0].record
    assert first == LayerRecord(
        name="0", conv_class="torch.nn.modules.conv.Conv2d", in_channels=3, out_channels=16, pooled_channels=16,
        grid="4x4", kernel_size=3, stride=1, pool="avg", sigma=0.1, route="graph", impl="auto",
    )  # fmt: skip
    assert plan.config.plan["widths"]["new"] == [3, 16, 25, 5] and plan.config.plan["entry"] == "0"
    kap = apply_plan(found.model, plan)
    assert kap[0].kap_pool.grid == ChannelGrid(4, 4) and kap(X).shape == (2, 5)


def test_a_record_round_trips_through_json_and_replays_to_the_same_layers():
    net = _net()
    kap = kapify.convert(net, k=3, sigma=0.1, example_input=X[:1]).eval()
    config = kapify.get_config(kap)
    again = KapConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    replayed = replay(copy.deepcopy(net), again).eval()
    assert kapify.get_config(replayed).layers == config.layers
    replayed.load_state_dict(kap.state_dict())
    torch.testing.assert_close(replayed(X), kap(X))


def test_convert_options_are_listed_once():
    """convert's keyword arguments and KapConfig's fields are ConvertOptions', with the same defaults."""
    params = inspect.signature(kapify.convert).parameters
    names = ConvertOptions.names()
    assert set(params) - {"model", "leaf_modules", "example_input"} == set(names)
    for option in dataclasses.fields(ConvertOptions):
        assert params[option.name].default == option.default, option.name
    recorded = {f.name for f in dataclasses.fields(KapConfig)}
    assert set(names) <= recorded


def test_the_record_keeps_every_option_it_was_given():
    given = dict(k=5, sigma=0.2, grid="rect", impl="activation", exclude=["3"], blend=0.5, arrange="similarity")
    kap = kapify.convert(_net(), example_input=X[:1], **given)
    assert ConvertOptions.of(kapify.get_config(kap)) == ConvertOptions.checked(**given)
