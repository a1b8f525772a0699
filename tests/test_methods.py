"""Compression methods as objects: defaults, the statistics each declares, and their planning."""

import numpy as np
import pytest
import torch

import moefx
from moefx.config import METHOD_NAMES
from moefx.methods import METHODS, BlockEvidence, cluster_hierarchically, merge_coefficients
from moefx.passes.observe import CalibrationNeeds
from moefx.zoo import example_inputs, tiny_model

OPTIONS = {"selection", "refit", "align", "adaptive"}


def test_every_method_name_has_an_object_with_a_default_for_every_method_option():
    assert tuple(METHODS) == METHOD_NAMES
    for name, method in METHODS.items():
        assert method.name == name and set(method.defaults) == OPTIONS


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_each_method_declares_the_statistics_its_options_need(name):
    method = METHODS[name]
    plain = method.needs(moefx.CompressionConfig(method=name))
    assert plain.all_token_outputs == (name == "hc-smoe")  # HC-SMoE clusters on every expert's mean output
    assert plain.weighted_input_moments == (name == "merge-refit")  # only its in+out refit needs them
    pruned = method.needs(moefx.CompressionConfig(method=name, router="pruned"))
    assert pruned.router_input_moments == (not method.prunes)  # a merged group's router row is fitted
    assert not plain.expert_input_moments  # LoSparse's moments come in a later pass of their own
    assert isinstance(plain, CalibrationNeeds)


def _block_statistics():
    model = moefx.prepare(tiny_model("mixtral"), example_inputs("mixtral"), experts=0.5, method="hc-smoe")
    moefx.calibrate(model, [example_inputs("mixtral", batch=4, seq=16, seed=s) for s in range(2)])
    from moefx.passes.observe import collect_statistics

    block = moefx.api.prepared_blocks(model)[0]
    graph = model.get_submodule(block.name)
    bank = graph.get_submodule("observed_experts").bank
    return collect_statistics(graph), graph.router.weight, [bank.ffn(e) for e in range(bank.num_experts)]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_each_method_groups_every_expert_once_around_the_kept_ones(name):
    stats, router_weight, ffns = _block_statistics()
    method, dominants = METHODS[name], [5, 1, 6, 2]
    config = moefx.CompressionConfig(method=name, experts=0.5)
    groups = method.groups(dominants, BlockEvidence(stats, router_weight, ffns), config, np.random.default_rng(0))
    assert len(groups) == len(dominants)
    if method.prunes:
        assert groups == [[1], [2], [5], [6]]  # the kept experts alone: the rest are dropped
    else:
        assert sorted(e for g in groups for e in g) == list(range(8))
    if name != "hc-smoe":  # HC-SMoE's clusters choose their own most used member
        assert sorted(g[0] for g in groups) == sorted(dominants)
    coefficients = method.coefficients(groups, stats.frequency)
    assert all(sum(c) == pytest.approx(1.0) for c in coefficients)
    if name == "average":
        assert all(len(set(c)) == 1 for c in coefficients)


def test_hierarchical_clustering_partitions_experts():
    features = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [10.0, 0.0]])
    groups = cluster_hierarchically(features, 3, torch.tensor([0.1, 0.5, 0.2, 0.1, 0.3]))
    assert sorted(sorted(g) for g in groups) == [[0, 1], [2, 3], [4]]
    assert [1, 0] in groups  # most used member first


def test_coefficients_of_never_activated_experts_are_uniform():
    coefficients = merge_coefficients([[0, 1], [2, 3]], torch.tensor([0.0, 0.0, 0.2, 0.6]), uniform=False)
    assert coefficients[0] == [0.5, 0.5]
    assert coefficients[1] == pytest.approx([0.25, 0.75])
