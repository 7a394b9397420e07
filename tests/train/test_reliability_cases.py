"""Where each bad-input case of shared/research/reliability.md §5 (A1-A14, B1-B9, C1-C10, D1-D17: 50
cases) is proven, and the two cases no other file holds (A13, the second signal of C4).

WHERE maps every case to the tests that fail without its behaviour: `file::test_function`, or
`file::[row]` for a row of tests/train/cli/test_bad_input.py's table (a part of its id). The audit test
checks that all 50 cases are mapped and that every pointer names a test that exists, so a renamed or
deleted test shows here. Policies as built (where they differ from the wording of reliability.md):
A13 content-equal rather than byte-equal (safetensors writes its metadata map in hash order); C3 a
stale checkpoint of another run stops the resume (C9's check), and rotation counts only checkpoints
below the one just written; C9 an
unreadable RNG state is an error, not a warning; D13 a caption that is not UTF-8 is decoded as
cp1252/latin-1 and reported with its byte offset (a fix, not an error); D7 a bad fit to the buckets
is a note, not a skip (pictures under data.min_side are skipped).
"""
from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adapterkit.adapters.lora import LoraSpec, add_lora
from adapterkit.adapters.lora_files import read_lora, save_lora, write_lora
from adapterkit.train.jobs.checkpoints import MARKER, checkpoint_dirs, write_checkpoint
from adapterkit.train.jobs.progress import StopSignals
from adapterkit.unet import PRESETS, UNet, load_unet, save_unet

TESTS = Path(__file__).resolve().parents[1]
BAD = "train/cli/test_bad_input.py"
DATA = "train/data/test_data.py"
FOLDER = "train/data/test_folder_reliability.py"
CKPT = "train/jobs/test_checkpoint_safety.py"
JOB = "train/jobs/test_lora_train.py"
SAFETY = "train/jobs/test_lora_train_safety.py"
UNET = "unet/test_checkpoint.py"
FUZZ = "unet/test_header_fuzz.py::test_mutated_headers_load_or_raise_checkpoint_error"
HERE = "train/test_reliability_cases.py"
ATOMIC = "adapters/test_load_atomic.py"

WHERE: dict[str, list[str]] = {
    # A. weight files
    "A1": [f"{BAD}::[(A1)]", f"{UNET}::test_bad_weights_file_is_named_and_explained"],
    "A2": [f"{BAD}::[(A2)]", f"{UNET}::test_bad_weights_file_is_named_and_explained"],
    "A3": [f"{BAD}::[(A3)]", f"{BAD}::[convert: HTML page as LoRA]"],
    "A4": [f"{BAD}::[(A4)]", f"{BAD}::[convert: torch pickle LoRA]"],
    "A5": [f"{BAD}::[truncated (A5)]", f"{BAD}::[trailing bytes (A5)]"],
    "A6": [f"{BAD}::[header length 2^40 (A6)]", f"{BAD}::[header not UTF-8 (A6)]", FUZZ],
    "A7": [f"{BAD}::[negative offset (A7)]", f"{BAD}::[overlapping offsets (A7)]", FUZZ],
    "A8": [f"{BAD}::[unknown dtype F99 (A8)]", f"{BAD}::[a dtype torch lacks (A8)]"],
    "A9": [f"{BAD}::[duplicate tensor key (A9)]"],
    "A10": [f"{BAD}::[NaN weights (A10)]", f"{UNET}::test_nan_and_inf_weights_are_named"],
    "A11": [f"{BAD}::[(A11, A12)]", f"{UNET}::test_pickle_with_code_is_not_executed_even_when_allowed"],
    "A12": [f"{BAD}::[(A11, A12)]",
            f"{UNET}::test_pickle_refused_by_default_and_read_weights_only_when_allowed"],
    "A13": [f"{HERE}::test_saving_over_the_file_a_model_was_loaded_from_keeps_its_content"],
    "A14": [f"{BAD}::[convert: disk full (A14)]", f"{BAD}::[merge: disk full (A14)]",
            "unet/test_weights.py::test_a_failed_write_leaves_the_old_file_and_no_temp",
            f"{UNET}::test_failed_save_keeps_the_previous_file_and_leaves_no_temp"],
    # B. adapters
    "B1": [f"{BAD}::[(B1)]"],
    "B2": [f"{BAD}::[(B2)]"],
    "B3": [f"{BAD}::[(B3)]"],
    "B4": [f"{BAD}::[(B4)]"],
    "B5": [f"{BAD}::[rank mismatch (B5)]", f"{BAD}::[alpha missing (B5)]",
           f"{BAD}::[alpha not a scalar (B5)]"],
    "B6": ["adapters/test_lora_files.py::test_metadata_that_contradicts_the_tensors_is_refused_citing_both"],
    "B7": [f"{BAD}::[(B7)]"],
    "B8": [f"{BAD}::[truncated ControlNet (B8)]", f"{BAD}::[ControlNet missing a tensor (B8)]"],
    "B9": [f"{ATOMIC}::test_a_lora_whose_last_layer_fails_in_peft_leaves_the_model_as_it_was",
           f"{ATOMIC}::test_a_lycoris_file_whose_last_layer_fails_in_peft_leaves_the_model_as_it_was",
           f"{ATOMIC}::test_a_dora_refused_after_peft_wrapped_its_layers_leaves_no_wrapper",
           f"{ATOMIC}::test_a_text_encoder_part_that_fails_takes_the_parts_before_it_out",
           f"{ATOMIC}::test_a_base_whose_text_encoder_part_fails_keeps_no_unet_part",
           f"{BAD}::[merge: LoRA whose last module does not fit its layer (B9)]",
           f"{BAD}::[sample: LoRA whose last module does not fit its layer (B9)]"],
    # C. training, checkpoints, interruption
    "C1": [f"{CKPT}::test_damage_in_every_checkpoint_stops_with_exit_2_naming_each",
           f"{JOB}::test_a_damaged_checkpoint_is_refused_not_restarted"],
    "C2": [f"{SAFETY}::test_a_checkpoint_without_its_marker_is_skipped_and_the_resume_repeats_the_run",
           f"{CKPT}::test_a_damaged_newest_checkpoint_is_passed_over_and_the_run_repeats_it"],
    "C3": [f"{SAFETY}::test_an_export_failing_mid_checkpoint_leaves_the_previous_checkpoint_as_it_was",
           f"{HERE}::test_rotation_keeps_the_checkpoint_just_written_beside_a_higher_numbered_one",
           f"{SAFETY}::test_only_the_newest_checkpoints_are_kept",
           f"{JOB}::test_a_checkpoint_of_another_run_is_not_resumed"],
    "C4": [f"{JOB}::test_sigint_writes_a_final_checkpoint_and_the_run_resumes_from_it",
           f"{SAFETY}::test_sigterm_writes_a_final_checkpoint_and_the_run_resumes_to_the_same_result",
           "train/jobs/test_distributed_signals.py::test_sigterm_on_one_process_stops_all_after_the_same_step",
           f"{HERE}::test_a_second_signal_stops_at_once_and_the_handlers_are_put_back"],
    "C5": [f"{JOB}::test_out_of_memory_names_the_sizes_to_change_and_keeps_the_checkpoint",
           "train/jobs/test_loop.py::test_the_jobs_oom_explanation_wraps_each_step"],
    "C6": [f"{JOB}::test_nan_loss_stops_with_the_last_good_checkpoint_intact",
           "train/jobs/test_loop.py::test_a_nan_between_reads_stops_at_the_next_read_naming_its_step"],
    "C7": ["train/data/test_cache.py::test_nan_latents_stop_the_build_naming_the_image"],
    "C8": [f"{JOB}::test_resume_after_a_crash_equals_the_uninterrupted_run",
           f"{CKPT}::test_kill_9_at_random_moments_of_checkpoint_writes_resumes_to_the_uninterrupted_run"],
    "C9": [f"{CKPT}::test_damage_in_every_checkpoint_stops_with_exit_2_naming_each",
           f"{JOB}::test_a_checkpoint_of_another_run_is_not_resumed"],
    "C10": [f"{BAD}::[output.dir read-only (C10)]", f"{BAD}::[train: disk full during the run]",
            f"{JOB}::test_an_unwritable_output_folder_fails_before_loading_anything"],
    # D. image folders and captions
    "D1": [f"{BAD}::[(D1)]", f"{DATA}::test_policy_table"],
    "D2": [f"{BAD}::[truncated PNG (D2)]", f"{BAD}::[0-byte PNG (D2)]", f"{BAD}::[HTML named .jpg (D2)]"],
    "D3": [f"{BAD}::[(D3)]", f"{DATA}::test_policy_table"],
    "D4": [f"{FOLDER}::test_mixed_case_extensions_and_png_bytes_named_jpg_are_decoded_by_content"],
    "D5": [f"{BAD}::[(D5)]", f"{DATA}::test_policy_table"],
    "D6": [f"{BAD}::[(D6)]", f"{BAD}::[decompression bomb]",
           f"{DATA}::test_too_large_checked_before_decoding"],
    "D7": [f"{FOLDER}::test_strips_and_thumbnails_are_skipped_or_flagged_against_the_buckets"],
    "D8": [f"{DATA}::test_exif_orientation_is_applied", f"{DATA}::test_exif_orientation_jpeg",
           f"{DATA}::test_exif_rotated_size_is_recorded_upright"],
    "D9": [f"{FOLDER}::test_cmyk_goes_through_its_icc_profile_when_it_has_one", f"{DATA}::test_cmyk_colour"],
    "D10": [f"{DATA}::test_16bit_is_scaled_not_clipped"],
    "D11": [f"{DATA}::test_alpha_composited_on_white_hidden_colour_never_leaks"],
    "D12": [f"{FOLDER}::test_uncaptioned_pictures_without_a_trigger_are_refused_listing_them",
            f"{FOLDER}::test_the_trigger_word_is_the_fallback_caption_and_dropout_1_needs_none",
            f"{DATA}::test_missing_caption_error_policy", f"{BAD}::[(D12)]"],
    "D13": [f"{FOLDER}::test_control_characters_are_replaced_and_reported_per_file",
            f"{FOLDER}::test_caption_encodings_are_decoded_by_bom_or_named_with_the_byte_offset",
            "train/pipeline/test_sdxl_base.py::test_encode_text_equals_the_pipelines_encode_prompt"],
    "D14": [f"{FOLDER}::test_one_caption_for_two_pictures_of_one_name_is_flagged",
            f"{FOLDER}::test_byte_identical_pictures_are_reported_by_content",
            "train/jobs/test_validation.py::test_a_validation_folder_must_not_share_pictures_or_folders"],
    "D15": [f"{FOLDER}::test_a_symlink_out_of_the_folder_is_skipped_and_never_read",
            f"{FOLDER}::test_metadata_naming_a_file_outside_the_folder_is_reported"],
    "D16": [f"{FOLDER}::test_an_nfd_caption_pairs_with_its_nfc_picture",
            f"{FOLDER}::test_names_with_a_newline_or_bytes_not_utf8_are_shown_verbatim",
            f"{FOLDER}::test_a_picture_deleted_or_replaced_after_the_scan_is_an_error_naming_it"],
    "D17": [f"{BAD}::[(D17)]", f"{DATA}::test_all_bad_folder_says_why"],
}
CASES = [f"{group}{i}" for group, n in (("A", 14), ("B", 9), ("C", 10), ("D", 17)) for i in range(1, n + 1)]


def test_every_case_of_reliability_md_points_at_tests_that_exist():
    assert len(CASES) == 50 and sorted(WHERE) == sorted(CASES)
    for case, pointers in WHERE.items():
        assert pointers, case
        for pointer in pointers:
            path, _, name = pointer.partition("::")
            text = (TESTS / path).read_text()
            if name.startswith("["):                        # a row of the bad-input table, by its id
                assert re.search(r'Case\("[^"]*' + re.escape(name[1:-1]), text), f"{case}: {pointer}"
            else:
                assert re.search(rf"^def {re.escape(name)}\(", text, re.M), f"{case}: {pointer}"


# --- A13: saving over the file a model was loaded from ------------------------------------------------

def content(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    return load_file(str(path)), metadata


def same(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    return (a[1] == b[1] and a[0].keys() == b[0].keys()
            and all(a[0][k].dtype == b[0][k].dtype and torch.equal(a[0][k], b[0][k]) for k in a[0]))


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_saving_over_the_file_a_model_was_loaded_from_keeps_its_content(layout, tmp_path):
    """A13: load, then save to the same path (the loaded file still open or mapped): the file holds
    exactly what it held (every tensor bit-equal, the same metadata), for a U-Net and a LoRA."""
    torch.manual_seed(0)
    unet = UNet(PRESETS["tiny"])
    path = tmp_path / ("u.safetensors" if layout == "ldm" else "u")
    save_unet(unet, path, layout=layout)
    weights = path if layout == "ldm" else next(path.glob("*.safetensors"))
    before = content(weights)
    save_unet(load_unet(path), path, layout=layout)
    assert same(content(weights), before)

    add_lora(unet, LoraSpec(rank=2, alpha=2, targets="attn"))
    lora_path = tmp_path / "l.safetensors"
    save_lora(unet, lora_path)
    before = content(lora_path)
    write_lora(lora_path, read_lora(lora_path))
    assert same(content(lora_path), before)


# --- C4: a second signal ----------------------------------------------------------------------------

def test_a_second_signal_stops_at_once_and_the_handlers_are_put_back():
    """C4: the first SIGINT asks for a stop after the step (the loop then writes its checkpoint); a
    second one raises KeyboardInterrupt at once; leaving the block restores the handlers."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGTERM"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# --- C3: rotation never deletes the checkpoint just written --------------------------------------------

@pytest.mark.parametrize("keep", [1, 2])
def test_rotation_keeps_the_checkpoint_just_written_beside_a_higher_numbered_one(keep, tmp_path):
    """C3: a checkpoint numbered above this run's step (the damaged newest a resume passed over, or
    another run's) is neither counted nor deleted by rotation; the new one and `keep - 1` before it stay."""
    def fill(folder):
        (folder / "weights.bin").write_bytes(b"w")
    for step in (1, 2, 9):
        write_checkpoint(tmp_path, step, fill, {"step": step}, keep=0)
    write_checkpoint(tmp_path, 3, fill, {"step": 3}, keep=keep)
    kept = [d.name for d in checkpoint_dirs(tmp_path)]
    assert kept == ["step-000002", "step-000003", "step-000009"][2 - keep:]
    assert (tmp_path / "step-000003" / MARKER).is_file()
