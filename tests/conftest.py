"""Strict mode for the whole suite: no silent rank promotion, seeded randomness.

Also the quick tier: ``pytest -m "not slow"`` runs in under 90 s on 2 CPU
cores, ``pytest`` (what CI runs) runs everything. Besides the tests that carry
``@pytest.mark.slow`` themselves, the tests named in ``SLOW`` below get the
marker here, in one place, so that the tiers are chosen without editing the
test files.
"""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# Node ids (relative to the repository root) of tests that take seconds each on
# 2 CPU cores, mostly in XLA compilation: an entry names a folder ("…/"), a
# module, a test (all its parameters) or one parametrized case. Measured with
# `pytest -m "not slow" --durations=0`; each group says why it is slow and what
# the quick tier still runs of it.
SLOW = (
    # subprocesses, simulated device meshes, other libraries' models
    "tests/parity/test_torch_parity.py::test_fixture_group",  # every PyTorch fixture group
    "tests/parity/test_torch_parity.py::test_fixture_unbatched_path",
    "tests/parity/test_torch_parity.py::test_fixture_is_what_the_generator_writes",
    "tests/parity/test_torch_parity.py::test_live_against_torch",
    "tests/test_multiprocess.py",  # starts several JAX processes
    "tests/test_integration.py",  # trains Flax NNX models with optax
    "tests/test_parallel.py::test_distributed_example_runs_and_matches_one_device",
    "tests/test_parallel.py::test_mesh_checks_refuse_to_run_on_one_device",
    "tests/test_parallel.py::test_one_device_mesh_equals_plain_loss",
    "tests/test_packaging.py::test_the_readme_tour_runs",  # a 128k-vocabulary loss
    # `python -m jxent` runs (the argument checks stay quick)
    "tests/test_main.py::test_json_meets_the_bounds",
    "tests/test_main.py::test_json_figures_match_an_independent_recount",
    "tests/test_main.py::test_progress_goes_to_stderr",
    "tests/test_main.py::test_table_and_plot",
    "tests/test_main.py::test_a_reader_that_closes_early_ends_the_run_quietly",
    "tests/test_main.py::test_the_mle_of_a_context_never_seen_is_undefined",
    # the fused loss compiles a scan per configuration: one comparison with the
    # materialised loss, the fused path's error, vmap and traced-option tests stay quick
    "tests/test_linear.py::test_value_and_gradients_equal_materialised",
    "tests/test_linear.py::test_any_chunk_size",
    "tests/test_linear.py::test_vocab_parallel_in_shard_map",
    "tests/test_linear.py::test_all_targets_ignored",
    "tests/test_linear.py::test_leading_batch_axes",
    "tests/test_linear.py::test_flax_nnx_linear_head_training_step",
    "tests/test_linear.py::test_vmap_equals_batched_and_no_retracing",
    "tests/test_linear.py::test_tied_embedding_as_transpose",
    "tests/test_linear.py::test_memory_bounded_by_a_chunk",
    "tests/test_linear.py::test_bfloat16_within_2e2_of_float64",
    "jxent/_linear.py",  # its doctest
    "tests/test_fused.py::test_softmax_cross_entropy",
    "tests/test_fused.py::test_sequence_nll_and_nll_stats",
    "tests/test_fused.py::test_tied_embedding_bf16_and_chunk_sizes",
    "tests/test_fused.py::test_token_stats",
    "tests/test_fused.py::test_token_objective",
    "tests/test_fused.py::test_distillation_loss",
    # numerical gradient checks, forward mode and per-axis sweeps: one compile per case
    "tests/test_information.py::test_check_grads_interior",
    "tests/test_information.py::test_forward_mode",
    "tests/test_information.py::test_axis_equals_moveaxis",
    "tests/test_information.py::test_low_precision_is_computed_in_float32",
    "tests/test_information.py::test_vmap_equals_leading_batch_axes",
    "tests/test_information.py::test_where_equals_slicing",
    "tests/test_information.py::test_base_divides_by_log_base",
    "tests/test_information.py::test_from_logits_equal_probability_twins",
    "tests/test_softmax.py::test_integer_targets_equal_one_hot",
    "tests/test_softmax.py::test_check_grads_over_logits_and_probability_targets",
    "tests/test_softmax.py::test_class_axis_equals_moveaxis",
    "tests/test_softmax.py::test_masked_nonfinite_logits_leave_the_class_weight_gradient_finite",
    "tests/test_softmax.py::test_out_of_range_targets_under_jit_are_nan_never_wrapped",
    "tests/test_tokens.py::test_distillation_check_grads_forward_and_reverse",
    "tests/test_tokens.py::test_check_grads_forward_and_reverse",
    "tests/test_tokens.py::test_vocab_sharded_equals_unsharded",  # a simulated mesh
    "tests/test_tokens.py::test_divergences_match_numpy",
    "tests/test_tokens.py::test_hard_weight_targets_masks_and_reductions_match_numpy",
    # trains the toy models
    "tests/test_toy.py::test_final_loss_reaches_the_empirical_conditional_entropy",
    "tests/test_toy.py::test_loss_decomposes_into_entropy_plus_weighted_kl",
    "tests/test_toy.py::test_model_conditionals_reach_the_count_ratios",
    "jxent/toy.py::jxent.toy",  # the module doctest trains a model
)
# Cases of a test named in SLOW that the quick tier still runs.
QUICK = ("tests/test_linear.py::test_value_and_gradients_equal_materialised[everything-mean]",)


def _named(nodeid: str, entries: tuple[str, ...]) -> bool:
    return any(
        nodeid == e or nodeid.startswith((e + "[", e + "::")) or (e.endswith("/") and
                                                                  nodeid.startswith(e))
        for e in entries
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _named(item.nodeid, SLOW) and not _named(item.nodeid, QUICK):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded NumPy generator, fresh for every test."""
    return np.random.default_rng(20261129)
