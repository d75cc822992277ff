"""Reliability (issue 6): bad checkpoints, images, prompts and shapes get clear errors, never wrong answers.

Run: ``.venv/bin/python -m pytest tests/reliability -q`` (well under 2 minutes on the 2-core dev machine; the
hypothesis fuzz is bounded by fixed example counts and derandomised).

Where each case of the issue is shown. "here" = this folder; other paths are tests that already covered the case
before this folder existed (not repeated here).

Checkpoints (ValueError naming file, key, expected vs found; nothing written on failure)
    missing shard ............ tests/model/test_loading.py::test_missing_shard; here test_checkpoints.py::
                               test_index_names_an_absent_file
    truncated / corrupted .... test_loading.py::test_truncated_shard; here test_checkpoints.py::
                               test_damaged_shard_names_the_file_and_changes_nothing (9 kinds of damage)
    index names absent file .. here test_index_names_an_absent_file, test_index_names_a_file_outside_or_of_the_
                               wrong_kind, test_bad_index_file
    key missing / unexpected . test_loading.py::test_missing_key, test_key_missing_from_its_shard,
                               test_unexpected_key, test_key_in_shard_but_not_in_index
    wrong shape .............. test_loading.py::test_wrong_shape
    wrong dtype .............. here test_float_weight_stored_as_integers, test_quantised_weights_with_the_wrong_
                               integer_dtype (int8 vs uint8: was accepted silently, now refused);
                               test_float_weight_in_another_float_dtype_is_cast (allowed, as published)
    config vs weights ........ here test_config_disagreeing_with_the_weights
    quantised, bad method /
    group size ............... here test_quantised_checkpoint_with_unusable_config, test_quantised_checkpoint_with_
                               a_group_size_its_tensors_do_not_have, test_float_checkpoint_declared_quantised
    .bin / pickle refused .... test_loading.py::test_pickle_files_refused; here test_pickle_only_folder_is_refused_
                               without_unpickling, test_pickle_disguised_as_safetensors_is_not_unpickled
    not a checkpoint ......... here test_folders_that_are_not_checkpoints
    failed load writes nothing here test_damaged_shard_names_the_file_and_changes_nothing (digest of the folder),
                               test_nvlm_quantize_from_a_bad_checkpoint_writes_nothing
    atomic save / quantize ... test_loading.py::test_save_is_atomic; here test_interrupted_save_leaves_nothing,
                               test_save_interrupted_after_the_shards_leaves_nothing, test_killed_save_never_looks_
                               complete, test_interrupted_overwrite_keeps_the_old_checkpoint,
                               test_nvlm_quantize_interrupted_leaves_nothing

Images (tests/model/test_image.py has the unit tests; here test_images.py goes through NVLMProcessor)
    not an image, zero bytes . test_image.py::test_not_an_image, test_zero_bytes; here test_bad_image_files_name_
                               the_file
    truncated JPEG / PNG ..... test_image.py::test_truncated_file_fails_at_load; here test_truncated_file_is_
                               refused_even_if_pillow_was_told_to_accept_it (global LOAD_TRUNCATED_IMAGES)
    decompression bomb ....... test_image.py::test_pixel_cap_checked_from_header_before_decoding; here
                               test_decompression_bomb_cap_is_configurable_through_the_processor
    1x1, 100000x10 ........... test_image.py::test_extreme_images_load_and_tile; here test_extreme_sizes_through_
                               the_processor
    16-bit ................... test_image.py::test_sixteen_bit_scaled_not_clipped, test_int32_and_float_modes;
                               here test_sixteen_bit_png_from_a_file
    CMYK, palette, alpha ..... test_image.py::test_other_modes_become_rgb, test_transparency_composited_on_white;
                               here test_cmyk_jpeg_palette_gif_and_alpha_webp, test_every_pillow_mode_becomes_rgb_
                               and_tiles (18 modes)
    EXIF rotation ............ test_image.py::test_exif_orientation_applied (PNG, 6); here test_exif_orientation_
                               applied_for_jpeg (all 8 orientations)

Prompts (tests/model/test_processor.py has the unit tests; here test_prompts.py goes through model.chat/generate)
    longer than the context .. test_processor.py::test_context_length_error; here test_prompt_longer_than_the_
                               context_is_an_error, test_answer_is_cut_at_the_context (documented truncation)
    placeholders vs images ... test_processor.py::test_placeholder_count_must_match, tests/model/test_model.py::
                               test_image_token_count_mismatch; here test_placeholders_and_images_must_agree,
                               test_image_tokens_without_pixels_or_pixels_without_tokens
    user-typed tile tags ..... test_processor.py::test_tile_tags_typed_by_user_are_text, test_special_tokens_in_
                               question_are_neutralised; here test_user_typed_structure_is_text
    empty question ........... test_processor.py::test_empty_question; here test_empty_question

Kernels (test_kernels.py; per-op tests in tests/kernels/)
    wrong dtype/device/shape . per op: test_pixel_shuffle.py::test_bad_x, test_quant_linear.py::test_w4a16_value_
                               errors / test_w8a16_value_errors, test_tiled_attention.py::test_bad_inputs_raise,
                               test_gated_xattn.py::test_bad_arguments_raise; here one table of 30 cases for all ops
                               (test_bad_inputs_raise_value_errors_naming_the_argument)
    non-contiguous ........... test_pixel_shuffle.py::test_non_contiguous_inputs, test_tiled_attention.py::
                               test_strided_qkv_slices_without_copies, test_gated_xattn.py::test_strided_inputs_from_
                               model_layout; here test_non_contiguous_inputs_give_the_contiguous_answer
    K % group size ........... tests/kernels/test_packing.py::test_int4_group_size_errors, tests/model/test_quant.py::
                               test_int4_skips_layers_the_format_cannot_hold; here test_k_not_divisible_by_the_group_
                               size_is_refused_everywhere
    NaN / Inf ................ here test_*_propagate(s)_non_finite for every op (two regressions fixed: see
                               tiled_attention_ref and the gated cross-attention SDPA path)
    very large M ............. here test_very_large_m (70,000 rows)
    hypothesis fuzz .......... here test_fuzz_ops.py: every op vs an independent truth, cpu / ref / triton paths

Resources (test_resources.py): OOM while loading -> planner advice; absent device -> error before any file opens.
Concurrency (test_concurrency.py): generate from several threads = sequential results (per-model lock).
CLI (test_cli.py, plus the `nvlm quantize` and OOM tests above): one line, status 2, traceback only with --debug.
"""
