import copy
import functools
import io
import warnings

import pytest
import torch

import moefx
from moefx.capture import max_output_diff
from moefx.config import METHOD_NAMES, CompressionConfig
from moefx.zoo import example_inputs, tiny_model


def _calibration(family, batches=3, seed=0):
    return [example_inputs(family, batch=4, seq=16, seed=seed + s) for s in range(batches)]


@functools.cache
def _cached_compile(family, options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", moefx.MoefxWarning)
        return moefx.compile(tiny_model(family), _calibration(family), **dict(options))


def _compile(family, **options):
    """A compiled tiny model, shared between tests (do not mutate it)."""
    return _cached_compile(
        family, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
    )


def _outputs(model, family):
    with torch.no_grad():
        return model(**example_inputs(family, batch=3, seq=11, seed=99))


def test_keeping_every_expert_reproduces_the_model(family):
    model = tiny_model(family)
    compressed = moefx.compile(model, _calibration(family), experts=1.0)
    assert max_output_diff(_outputs(model, family), _outputs(compressed, family)) <= 1e-5
    assert all(b.kept == b.num_experts for b in compressed.moefx_report.blocks)


@pytest.mark.parametrize("experts, router", [(0.5, "exact"), (0.25, "pruned")])
def test_compression_keeps_the_requested_share_of_expert_parameters(family, experts, router):
    compressed = _compile(family, experts=experts, router=router)
    report = compressed.moefx_report
    per_expert = report.expert_params_before // sum(b.num_experts for b in report.blocks)
    target = experts * report.expert_params_before
    assert abs(report.expert_params_after - target) <= per_expert * len(report.blocks)
    assert sum(p.numel() for b in report.blocks for p in compressed.get_submodule(b.name).experts.parameters()) == (
        report.expert_params_after
    )
    out = _outputs(compressed, family)
    logits = out.logits if hasattr(out, "logits") else out
    assert logits.isfinite().all()


@pytest.mark.parametrize(
    "family, method",
    [(f, m) if f == "mixtral" or m == CompressionConfig.method else pytest.param(f, m, marks=pytest.mark.slow)
     for f in ("mixtral", "switch") for m in METHOD_NAMES],  # switch's encoder-decoder: the default by default
)  # fmt: skip
def test_every_method_compresses(family, method):
    compressed = _compile(family, experts=0.5, method=method, **({"rank": 4} if method == "mc-smoe" else {}))
    report = compressed.moefx_report
    assert sum(b.expert_params_merged for b in report.blocks) * 2 == report.expert_params_before
    if method == "mc-smoe":  # merged, then low-rank plus sparse
        assert report.expert_params_after < sum(b.expert_params_merged for b in report.blocks)
    else:
        assert report.expert_params_after * 2 == report.expert_params_before
    logits = _outputs(compressed, family)
    logits = logits.logits if hasattr(logits, "logits") else logits
    assert logits.isfinite().all()
    if method in ("prune-frequency", "reap"):
        for b in report.blocks:  # pruning: a pruned router with one row per kept expert, no merging
            block = compressed.get_submodule(b.name)
            assert all(len(g) == 1 for g in b.groups) and block.router.weight.shape[0] == b.kept


@pytest.mark.parametrize("family", ["mixtral", "switch"])
def test_merge_refit_leaves_one_member_groups_as_their_expert(family):
    # refitting a group of one would re-solve its expert's own projections: the second pass skips them
    observed = moefx.prepare(tiny_model(family), _calibration(family)[0])  # the original experts, as moefx reads them
    compressed = _compile(family, experts=0.5)
    for b in compressed.moefx_report.blocks:
        original = observed.get_submodule(f"{b.name}.observed_experts").bank
        merged = compressed.get_submodule(b.name).experts
        singles = [(g, members[0]) for g, members in enumerate(b.groups) if len(members) == 1]
        assert singles and len(singles) < len(b.groups)
        for g, e in singles:
            for got, want in zip(merged.ffn(g).tensors(), original.ffn(e).tensors(), strict=True):
                assert (got is None and want is None) or torch.equal(got, want)


def test_the_state_dict_really_shrinks():
    model = tiny_model("mixtral")
    compressed = _compile("mixtral", experts=0.25, router="pruned")

    def saved_bytes(m):
        buffer = io.BytesIO()
        torch.save(m.state_dict(), buffer)
        return buffer.tell()

    experts_before = sum(p.numel() for n, p in model.named_parameters() if "experts" in n)
    experts_after = sum(p.numel() for n, p in compressed.named_parameters() if "experts" in n)
    assert experts_after * 4 == experts_before
    saved = saved_bytes(model) - saved_bytes(compressed)
    assert saved >= 0.9 * (experts_before - experts_after) * 4  # float32 bytes of the dropped experts


def test_the_input_model_is_not_modified():
    model = tiny_model("qwen2_moe")
    before = copy.deepcopy(model.state_dict())
    modules = dict(model.named_modules())
    moefx.compile(model, _calibration("qwen2_moe"), experts=0.25)
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_transformers_model_stays_one_and_generates():
    model = tiny_model("mixtral")
    compressed = _compile("mixtral", experts=0.5, router="pruned")
    assert type(compressed) is type(model)
    prompt = example_inputs("mixtral", batch=1, seq=4)["input_ids"]
    generated = compressed.generate(prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)


def test_prepare_calibrate_convert_equals_compile():
    calib = _calibration("olmoe")
    model = tiny_model("olmoe")
    probe = moefx.prepare(model, calib[0])
    assert max_output_diff(_outputs(probe, "olmoe"), _outputs(model, "olmoe")) <= 1e-6  # observing changes nothing
    observed = moefx.prepare(model, calib[0], experts=0.5)
    for batch in calib:
        with torch.no_grad():
            observed(**batch)
    manual = moefx.convert(observed, calib_batches=calib)
    automatic = moefx.compile(model, calib, experts=0.5)
    assert max_output_diff(_outputs(manual, "olmoe"), _outputs(automatic, "olmoe")) <= 1e-6
    observed = moefx.prepare(model, calib[0])
    moefx.calibrate(observed, calib)
    with pytest.warns(moefx.MoefxWarning, match="not refit"):
        moefx.convert(observed, experts=0.5)  # without the batches again the refit cannot run


@pytest.mark.parametrize(
    ("prepared", "converted"),
    [({"method": "m-smoe"}, {"method": "merge-refit"}), ({}, {"router": "pruned"}), ({}, {"method": "hc-smoe"})],
)
def test_convert_refuses_options_whose_statistics_prepare_did_not_collect(prepared, converted):
    calib = _calibration("olmoe")
    observed = moefx.prepare(tiny_model("olmoe"), calib[0], **prepared)
    moefx.calibrate(observed, calib)
    with pytest.raises(moefx.ConfigError, match="pass the same options to moefx.prepare") as error:
        moefx.convert(observed, calib_batches=calib, **converted)
    assert "\n" not in str(error.value)


def test_bfloat16_models_compile_in_their_dtype():
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    compressed = moefx.compile(model, _calibration("qwen3_moe"), experts=0.5)
    assert {p.dtype for p in compressed.parameters()} == {torch.bfloat16}
    assert _outputs(compressed, "qwen3_moe").logits.isfinite().all()


def test_an_expert_never_activated_is_merged_without_nan():
    model = tiny_model("gpt_oss")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[3] = -1e4  # expert 3 is never chosen
    compressed = moefx.compile(model, _calibration("gpt_oss"), experts=0.5)
    assert all(b.frequency[3] == 0.0 for b in compressed.moefx_report.blocks)
    assert all(p.isfinite().all() for p in compressed.parameters())


def test_skip_layers_leaves_a_block_unchanged():
    compressed = _compile("mixtral", experts=0.5, skip_layers=[0])
    first, second = compressed.moefx_report.blocks
    assert first.kept == 8 and first.router == "unchanged" and second.kept == 4


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"experts": 0.0}, moefx.ConfigError, "out of range"),
        ({"experts": 1.5}, moefx.ConfigError, "out of range"),
        ({"experts": -2}, moefx.ConfigError, "out of range"),
        ({"experts": True}, moefx.ConfigError, "fraction"),
        ({"experts": 0.1, "method": "m-smoe"}, moefx.ConfigError, "fewer than their top_k"),
        ({"experts": 0.1}, moefx.ConfigError, "fewer than its top_k"),
        ({"experts": 9}, moefx.ConfigError, "experts=9 is more than model.layers.0.mlp's 8 experts: give at most 8"),
        ({"method": "magic"}, moefx.ConfigError, "unknown method 'magic'"),
        ({"router": "fast"}, moefx.ConfigError, "unknown router"),
        ({"expert": 0.5}, moefx.ConfigError, "unknown option 'expert'"),
        ({"skip_layers": ["model.layers.9.mlp"]}, moefx.ConfigError, "not an MoE block"),
    ],
)
def test_bad_options_get_one_line_errors(options, error, message):
    with pytest.raises(error, match=message) as info:
        moefx.compile(tiny_model("mixtral"), _calibration("mixtral", batches=1), **options)
    assert "\n" not in str(info.value)


def test_bad_calibration_data_gets_one_line_errors():
    model = tiny_model("mixtral")
    with pytest.raises(moefx.CalibrationError, match="yielded no batches"):
        moefx.compile(model, [])
    exhausted = iter(_calibration("mixtral", batches=1))
    list(exhausted)
    with pytest.raises(moefx.CalibrationError, match="yielded no batches"):
        moefx.compile(model, exhausted)
    with pytest.raises(moefx.CalibrationError, match="must be an iterable of batches"):
        moefx.compile(model, 42)
    with pytest.raises(moefx.CalibrationError, match="must be an iterable of batches"):
        moefx.compile(model, example_inputs("mixtral"))


def test_a_dense_model_is_rejected_with_one_line():
    with pytest.raises(moefx.DetectionError, match="no MoE block found in MistralForCausalLM"):
        moefx.compile(tiny_model("dense"), _calibration("dense", batches=1))


def test_a_meta_device_model_is_rejected():
    with torch.device("meta"):
        model = tiny_model("mixtral")
    with pytest.raises(moefx.MoefxError, match="meta device"):
        moefx.compile(model, _calibration("mixtral", batches=1))


def test_convert_needs_a_prepared_model():
    with pytest.raises(moefx.MoefxError, match="returned by moefx.prepare"):
        moefx.convert(tiny_model("mixtral"))


@pytest.mark.parametrize("family", ["mixtral", "switch"])
def test_pruned_and_exact_routers_agree_on_the_kept_experts(family):
    exact = _compile(family, experts=0.5, router="exact")
    pruned = _compile(family, experts=0.5, router="pruned")
    assert [b.groups for b in exact.moefx_report.blocks] == [b.groups for b in pruned.moefx_report.blocks]


def test_mc_smoe_at_full_rank_keeping_everything_equals_m_smoe(family):
    m_smoe = _compile(family, experts=0.5, method="m-smoe")
    mc_smoe = _compile(family, experts=0.5, method="mc-smoe", rank=1.0, sparse_keep=1.0)
    assert max_output_diff(_outputs(m_smoe, family), _outputs(mc_smoe, family)) <= 1e-4


@pytest.mark.parametrize("family", ["mixtral", "switch", "gpt_oss", "deepseek_v3"])
def test_mc_smoe_shrinks_parameters_and_flops_as_configured(family):
    compressed = _compile(family, experts=0.5, method="mc-smoe", rank=4, sparse_keep=0.1, stable_ranks=True)
    report = compressed.moefx_report
    linears = [
        m
        for b in report.blocks
        for e in compressed.get_submodule(b.name).experts.experts
        for m in (*e.in_linears, e.out_linear)
    ]
    assert {m.rank for m in linears} == {4}
    assert sum(m.index.numel() for m in linears) == round(0.1 * sum(m.in_features for m in linears))
    assert report.expert_params_after == sum(m.num_parameters() for m in linears)
    for b in report.blocks:
        assert b.expert_params_after < b.expert_params_merged < b.expert_params_before
        assert b.flops_after < b.flops_merged <= b.flops_before
        assert len(b.stable_rank_before) == b.num_experts and len(b.stable_rank_after) == b.kept
    logits = _outputs(compressed, family)
    assert (logits.logits if hasattr(logits, "logits") else logits).isfinite().all()


def _kept_columns(model):
    return [
        m.index.tolist()
        for b in model.moefx_report.blocks
        for e in model.get_submodule(b.name).experts.experts
        for m in (*e.in_linears, e.out_linear)
    ]


def test_gradient_scores_keep_the_same_budget_by_another_ranking():
    options = {"experts": 0.5, "method": "mc-smoe", "rank": 4, "sparse_keep": 0.1}
    by_activation = _compile("mixtral", **options)
    by_gradient = _compile("mixtral", **options, sparse_score="gradient")  # the causal LM's own loss
    activation_kept, gradient_kept = _kept_columns(by_activation), _kept_columns(by_gradient)
    assert sum(map(len, gradient_kept)) == sum(map(len, activation_kept)) > 0
    assert gradient_kept != activation_kept
    report = by_gradient.moefx_report
    assert report.expert_params_after < sum(b.expert_params_merged for b in report.blocks)
    assert _outputs(by_gradient, "mixtral").logits.isfinite().all()


def test_gradient_scores_need_a_loss():
    model = tiny_model("switch")
    calibration = _calibration("switch")
    options = {"experts": 0.5, "method": "mc-smoe", "rank": 4, "sparse_score": "gradient"}
    with pytest.raises(moefx.ConfigError, match="needs a loss: .* labels") as failure:
        moefx.compile(model, calibration, **options)
    assert "\n" not in str(failure.value)
    with_labels = [{**b, "labels": b["decoder_input_ids"]} for b in calibration]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", moefx.MoefxWarning)
        assert _kept_columns(moefx.compile(model, with_labels, **options))
        hand_written = tiny_model("hand_written")
        calls = []

        def loss(output, batch):
            calls.append(batch)
            return output.square().mean()

        moefx.compile(hand_written, _calibration("hand_written"), loss=loss, **options)
    assert len(calls) == 3


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"rank": 0}, "rank=0"),
        ({"rank": 1.5}, "rank=1.5"),
        ({"sparse_keep": 2.0}, "sparse_keep"),
        ({"svd": "exact"}, "unknown svd"),
        ({"sparse_axis": "diag"}, "unknown sparse_axis"),
        ({"sparse_score": "hessian"}, "unknown sparse_score"),
    ],
)
def test_losparse_options_are_validated(bad, message):
    with pytest.raises(moefx.ConfigError, match=message):
        moefx.CompressionConfig(method="mc-smoe", **bad)
