"""Shared fixtures: tiny victims and a synthetic client batch."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile

import jax
import pytest

import vidleak_jax as vl

jax.config.update("jax_numpy_dtype_promotion", "strict")
# Many tests (and the entry points they start as subprocesses, which inherit the environment)
# compile the same tiny attacks: JAX's persistent cache compiles each program once per machine.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"vidleak_jax_tests_xla_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
VICTIM_NAMES = ("c3d", "frame_cnn", "cnn_rnn")
TINY = dict(frames=4, height=16, width=16, channels=3)


def run_main(*args: str, cwd: str = ROOT, env: dict | None = None, popen: bool = False,
                **popen_kwargs):
  """`python -m experiments.main *args` in a subprocess: the finished process (text output), or
  the running Popen when `popen`."""
  cmd = [sys.executable, "-m", "experiments.main", *args]
  if popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, **popen_kwargs)
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                        check=False)


@functools.lru_cache(maxsize=None)
def tiny_victim(name: str, seed: int = 1, pooling: str | None = None):
  """(apply_fn, params) of victim `name` for 4×16×16×3 clips and 4 classes."""
  kwargs = {} if pooling is None else {"pooling": pooling}
  module = vl.models.create(name, jax.random.key(seed), num_classes=4, **TINY, **kwargs)
  return vl.models.pure(module)


@functools.lru_cache(maxsize=None)
def tiny_batch(batch_size: int = 1, seed: int = 0):
  """(clips [B,4,16,16,3], labels [B]) of synthetic video."""
  return vl.data.synthetic_clips(jax.random.key(seed), batch_size, num_classes=4, **TINY)


@pytest.fixture(params=VICTIM_NAMES)
def victim_name(request) -> str:
  return request.param

# The fast tier (`pytest -m "not slow"`, the edit loop): tests that took 5 s or more in a cold
# 2-core run of the whole suite join the slow tier here, except one of each kind kept as a smoke
# check (the entry point's end-to-end run, a 3-D convolution rewrite, a finite-difference
# gradient, a tiny attack, the compile-once guard). Remeasure with `pytest -n 2 --durations=0`.
SLOW_IN_FAST_TIER = frozenset({
    "test_attack.py::test_batch_label_counts_are_recovered",
    "test_attack.py::test_batched_restarts_equal_independent_runs[map-1]",
    "test_attack.py::test_batched_restarts_equal_independent_runs[map-2]",
    "test_attack.py::test_batched_restarts_equal_independent_runs[vmap-2]",
    "test_attack.py::test_lbfgs_runs_per_restart",
    "test_attack.py::test_reconstruct_compiles_a_fixed_number_of_times",
    "test_attack.py::test_reconstruct_recovers_labels_of_a_model_with_arbitrary_leaf_names[labels0]",
    "test_attack.py::test_reconstruct_recovers_labels_of_a_model_with_arbitrary_leaf_names[labels1]",
    "test_attack.py::test_reference_frames_of_the_camera_improve_the_reconstruction",
    "test_attack.py::test_reference_frames_recover_batch_labels_through_a_frozen_extractor",
    "test_benchmark.py::test_benchmark_row_is_consistent[c3d]",
    "test_benchmark.py::test_benchmark_row_is_consistent[frame_cnn]",
    "test_benchmark.py::test_conv_modes_agree_at_the_start_and_the_profile_is_in_the_row",
    "test_benchmark.py::test_keep_going_records_a_failing_configuration_and_times_the_others",
    "test_captured.py::test_attack_stage_inverts_a_captured_update",
    "test_captured.py::test_npz_and_safetensors_round_trip",
    "test_captured.py::test_npz_bombs_are_refused_from_their_headers[deflated-shape1]",
    "test_captured.py::test_unknown_keys_are_refused_without_reading_data",
    "test_extractors.py::test_extractor_maps_clips_to_one_feature_vector_per_frame[alexnet-256]",
    "test_extractors.py::test_extractor_maps_clips_to_one_feature_vector_per_frame[resnet18-512]",
    "test_extractors.py::test_extractor_maps_clips_to_one_feature_vector_per_frame[vgg16-512]",
    "test_fast_convs.py::test_gradient_matching_loss_is_the_same_with_and_without_the_rewrite[lax]",
    "test_fast_convs.py::test_gradient_matching_loss_is_the_same_with_and_without_the_rewrite[linen]",
    "test_fast_convs.py::test_gradient_matching_loss_is_the_same_with_and_without_the_rewrite[nnx]",
    "test_fast_convs.py::test_nested_jit_scan_cond_remat_custom_jvp_and_custom_vjp_models",
    "test_fast_convs.py::test_rewritten_conv_equals_xla_conv_in_vmap_with_grad_of_grad[2d_batch_groups]",
    "test_fast_convs.py::test_rewritten_conv_equals_xla_conv_in_vmap_with_grad_of_grad[2d_depthwise]",
    "test_fast_convs.py::test_rewritten_conv_equals_xla_conv_in_vmap_with_grad_of_grad[2d_explicit_negative]",
    "test_fast_convs.py::test_rewritten_conv_equals_xla_conv_in_vmap_with_grad_of_grad[2d_groups]",
    "test_fast_convs.py::test_rewritten_conv_equals_xla_conv_in_vmap_with_grad_of_grad[2d_highest_precision]",
    "test_fast_convs.py::test_rewritten_conv_equals_xla_conv_in_vmap_with_grad_of_grad[2d_lhs_dilation]",
    "test_fast_convs.py::test_rewritten_conv_equals_xla_conv_in_vmap_with_grad_of_grad[2d_mixed_layouts]",
    "test_fast_convs.py::test_rewritten_conv_equals_xla_conv_in_vmap_with_grad_of_grad[2d_nhwc]",
    "test_fast_convs.py::test_rewritten_conv_equals_xla_conv_in_vmap_with_grad_of_grad[2d_rhs_dilation]",
    "test_fast_convs.py::test_rewritten_conv_equals_xla_conv_in_vmap_with_grad_of_grad[2d_same_lower]",
    "test_fast_convs.py::test_rewritten_conv_equals_xla_conv_in_vmap_with_grad_of_grad[3d_ndhwc]",
    "test_fast_path.py::test_fast_path_equals_plain_vmapped_objective[c3d-cosine]",
    "test_fast_path.py::test_fast_path_equals_plain_vmapped_objective[cnn_rnn-cosine]",
    "test_fast_path.py::test_fast_path_equals_plain_vmapped_objective[cnn_rnn-l1]",
    "test_fast_path.py::test_fast_path_equals_plain_vmapped_objective[cnn_rnn-l2]",
    "test_fast_path.py::test_fast_path_equals_plain_vmapped_objective[frame_cnn-cosine]",
    "test_fast_path.py::test_fast_path_equals_plain_vmapped_objective[frame_cnn-l1]",
    "test_fast_path.py::test_fast_path_equals_plain_vmapped_objective[frame_cnn-l2]",
    "test_feature_attack.py::test_batched_restarts_equal_separate_runs_from_the_same_starts[map]",
    "test_feature_attack.py::test_batched_restarts_equal_separate_runs_from_the_same_starts[vmap]",
    "test_feature_attack.py::test_feature_checkpoints_of_other_settings_or_stages_are_refused",
    "test_feature_attack.py::test_feature_inversion_from_reference_frames_beats_gray",
    "test_feature_attack.py::test_feature_matching_recovers_a_gru_heads_feature_matrix",
    "test_feature_attack.py::test_matching_in_the_input_span_recovers_every_clip_of_a_batch",
    "test_feature_attack.py::test_restarts_escape_a_local_minimum_of_feature_matching",
    "test_feature_table.py::test_sweeps_of_different_seeds_merge_into_one_table",
    "test_inputs.py::test_valid_inputs_give_the_same_numbers_eagerly_under_jit_and_vmap",
    "test_main.py::test_attack_without_data_explains_which_stage_is_missing",
    "test_models.py::test_pure_apply_equals_the_module_call",
    "test_models.py::test_victims_map_clips_to_logits[c3d]",
    "test_objectives.py::test_gradient_wrt_clips_matches_central_differences[cnn_rnn-cosine]",
    "test_objectives.py::test_gradient_wrt_clips_matches_central_differences[cnn_rnn-l2]",
    "test_objectives.py::test_gradient_wrt_clips_matches_central_differences[frame_cnn-cosine]",
    "test_objectives.py::test_gradient_wrt_clips_matches_central_differences[frame_cnn-l2]",
    "test_pallas_conv.py::test_attack_with_the_pallas_conv_matches_im2col",
    "test_pallas_conv.py::test_forward_and_vjp_equal_lax[2]",
    "test_pallas_conv.py::test_forward_and_vjp_equal_lax[3]",
    "test_pallas_conv.py::test_vmap_over_per_candidate_kernels_equals_a_loop",
    "test_reference_prior.py::test_zero_references_leave_the_attack_unchanged",
    "test_report.py::test_run_report_embeds_clips_and_plots_and_loads_nothing_external",
    "test_resources.py::test_driver_refuses_a_step_that_cannot_fit_before_the_first_dispatch",
    "test_resources.py::test_estimate_is_a_lower_bound_within_the_documented_factor[c3d-1-4-map-signed_adam]",
    "test_resources.py::test_estimate_is_a_lower_bound_within_the_documented_factor[cnn_rnn-1-4-vmap-lbfgs]",
    "test_resume.py::test_a_stop_requested_after_the_last_dispatch_keeps_the_finished_attack",
    "test_reuse.py::test_a_finished_run_is_reused_and_one_of_other_settings_refused",
    "test_rundir.py::test_a_captured_update_is_never_scored_against_generated_clips",
    "test_rundir.py::test_the_entry_point_names_the_flag_of_a_refused_resume",
    "test_sr.py::test_interrupted_training_resumes_to_the_same_model",
    "test_sr.py::test_lpips_and_temporal_error",
})


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  for item in items:
    if item.nodeid.removeprefix("tests/") in SLOW_IN_FAST_TIER:
      item.add_marker(pytest.mark.slow)
