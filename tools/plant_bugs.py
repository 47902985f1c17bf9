"""Plant known bugs one at a time and check that the test guarding each behaviour fails (then restore the file).

    python tools/plant_bugs.py            # all of them (about 10 minutes on 2 cores)
    python tools/plant_bugs.py 3 7        # only mutants 3 and 7

Each entry: (what breaks, file, exact text, replacement, the test that must catch it). A MISSED line means the suite
no longer guards that behaviour. Files are restored even if a run is interrupted by an exception.
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MUTANTS = [
    (
        "entropy-coded export: negative codes decoded with the wrong sign",
        "lightning_xai/quantization/export.py",
        "np.where(block % 2 == 0, block // 2, -(block + 1) // 2)",
        "np.where(block % 2 == 0, block // 2, (block + 1) // 2)",
        "tests/test_export.py::test_lzma_and_bits_codings_reload_the_same_model",
    ),
    (
        "entropy-coded export: the decoder is not bounded by the bit-width table",
        "lightning_xai/quantization/export.py",
        "raw = decoder.decompress(blob, max_length=count * nbytes)",
        "raw = decoder.decompress(blob)",
        "tests/test_export.py::test_damaged_lzma_stream_is_refused",
    ),
    (
        "entropy-coded export: codes keep their per-width offset (same code, different symbols per channel)",
        "lightning_xai/quantization/export.py",
        "np.where(c >= 0, 2 * c, -2 * c - 1)",
        "c + np.left_shift(1, np.maximum(k[k > 0] - 1, 0))[:, None]",
        "tests/test_export.py::test_lzma_payload_decodes_with_the_standard_library_to_the_quantizer_codes",
    ),
    (
        "Swin window attention: attention weights not held constant",
        "lightning_xai/attribution/lrp.py",
        "    with torch.enable_grad(), _constant_softmax():",
        "    with torch.enable_grad():",
        "tests/test_lrp_attention.py::test_swin_window_attention_conserves_relevance_and_restores_softmax",
    ),
    (
        "quantizer row products break once a layer has no rows left",
        "lightning_xai/quantization/ste.py",
        "torch.bmm(a.flatten(1).unsqueeze(1), b.flatten(1).unsqueeze(2)).view(c)",
        "torch.bmm(a.reshape(c, 1, -1), b.reshape(c, -1, 1)).view(c)",
        "tests/test_heads.py::test_self_compression_removes_heads_while_training_and_the_export_reloads_exactly",
    ),
    (
        "idle units: a producer counts as idle although a consumer is alive",
        "lightning_xai/pruning/surgery.py",
        "        if consumers and consumers <= silent:",
        "        if consumers:",
        "tests/test_heads.py::test_units_and_heads_feeding_only_silent_layers_are_idle_and_removed",
    ),
    (
        "head removal: the value rows of a head are not checked (a head with dead queries counts as dead)",
        "lightning_xai/pruning/heads.py",
        "all(2 * inner + h * hd + j in dead_rows for j in range(hd))",
        "all(h * hd + j in dead_rows for j in range(hd))",
        "tests/test_heads.py::test_live_head_with_dead_rows_is_reported_not_removed",
    ),
    (
        "pruned-head attention forgets the 1/sqrt(head_dim) scale when it returns weights",
        "lightning_xai/pruning/heads.py",
        "            scores = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1)",
        "            scores = q @ k.transpose(-2, -1)",
        "tests/test_heads.py::test_pruned_forward_matches_silenced_heads",
    ),
    (
        "CP-LRP: relevance split in half at the attention mixing (the AttnLRP uniform rule)",
        "lightning_xai/attribution/lrp.py",
        "    s = r_ch / _stabilize(ch if cp else 2 * ch, eps)",
        "    s = r_ch / _stabilize(2 * ch, eps)",
        "tests/test_lrp_attention.py::test_cp_lrp_conserves_relevance_through_attention",
    ),
    (
        "AttnLRP: softmax rule without its centring term",
        "lightning_xai/attribution/lrp.py",
        "        r_logits = x * (r_attn - attn * r_attn.sum(-1, keepdim=True))",
        "        r_logits = x * r_attn",
        "tests/test_lrp_attention.py::test_transformer_block_agrees_with_lxt",
    ),
    (
        "residual branch detection ignores where the residual comes from",
        "lightning_xai/pruning/layer_pruning.py",
        "            if carried_from_layer and in_fn.get(owner) is not None and _reaches(in_fn[owner], residual):",
        "            if carried_from_layer:",
        "tests/test_branch_bypass.py::test_additions_without_a_residual_are_not_branches",
    ),
    (
        "C-SWAP head units masked at the attention's input instead of its heads",
        "lightning_xai/pruning/units.py",
        "                    if attention is not None:  # out_proj is called functionally: mask the heads inside",
        "                    if False:",
        "tests/test_cswap.py::test_attention_heads_are_units_masked_like_their_removal",
    ),
    (
        "C-SWAP's analysis runs with TF32 allowed",
        "lightning_xai/pruning/cswap.py",
        "    with _eval_mode(model), full_fp32():",
        "    with _eval_mode(model):",
        "tests/test_cswap.py::test_the_causal_analysis_runs_without_tf32_and_restores_the_settings",
    ),
    (
        "batched quantization: the bit-depth gradient has the wrong sign",
        "lightning_xai/quantization/batched.py",
        "grad_b = list((sums[:, 1] * (hs * alive) * -LN2).split(meta.channels))",
        "grad_b = list((sums[:, 1] * (hs * alive) * LN2).split(meta.channels))",
        "tests/test_batched.py::test_batched_equals_per_layer_forward_and_backward",
    ),
    (
        "batched quantization: slices served after their backward (stale graph under checkpointing)",
        "lightning_xai/quantization/quantizer.py",
        "and (serving.active or (not serving.done and torch._C._current_graph_task_id() >= 0))",
        "and (serving.active or torch._C._current_graph_task_id() >= 0)",
        "tests/test_batched.py::test_activation_checkpointing_replays_the_served_weights",
    ),
    (
        "batched quantization: torch-pruning traces the batched node (every layer coupled)",
        "lightning_xai/pruning/surgery.py",
        "            with torch.enable_grad(), per_layer_quantization():  # tracing reads the autograd graph",
        "            with torch.enable_grad():",
        "tests/test_batched.py::test_dependency_tracing_sees_the_layers_not_the_batch",
    ),
    (
        "fit-end work left on the CPU: the model is not moved back and forth",
        "lightning_xai/callbacks/_data.py",
        "    pl_module.to(target)\n    _optimizers_to_device(optimizers, target)",
        "    _optimizers_to_device(optimizers, target)",
        "tests/test_fake_cuda.py::test_fit_end_work_runs_on_the_training_device_and_the_model_returns_to_the_cpu",
    ),
    (
        "the resize hook holds the trainer strongly",
        "lightning_xai/callbacks/_resize.py",
        "functools.partial(_resize_hook, weakref.ref(trainer))",
        "functools.partial(_resize_hook, trainer)",
        "tests/test_reload.py::test_the_resize_hook_does_not_drag_the_trainer_into_deep_copies",
    ),
    (
        "the strongest channel of a cut layer is not held",
        "lightning_xai/callbacks/self_compression.py",
        "            self._hold([layer.quantizer.b for layer in self.compressor.layers if layer.name in held])",
        "            pass",
        "tests/test_keep_channels.py::test_huge_gamma_with_the_defaults_keeps_the_output_connected",
    ),
    (
        "LRP identity rule scales the relevance",
        "lightning_xai/attribution/lrp.py",
        '        elif kind == "identity":\n            give(tensor_args[0], r)',
        '        elif kind == "identity":\n            give(tensor_args[0], r * 0.5)',
        "tests/test_lrp_modern.py::test_elementwise_activation_identity_rule_conserves",
    ),
    (
        "LRP gate receives relevance",
        "lightning_xai/attribution/lrp.py",
        "            give(signal, _unbroadcast(r, env[signal].shape))",
        "            give(signal, _unbroadcast(r, env[signal].shape) * 0.5)\n            give((a, b)[gate], r * 0.5)",
        "tests/test_lrp_modern.py::test_squeeze_excitation_gate_gets_no_relevance",
    ),
    (
        "quantile pruning widened by ties",
        "lightning_xai/quantization/mixed.py",
        "            keep_flat[torch.argsort(flat, stable=True)[:count]] = False",
        "            keep_flat = flat > torch.quantile(flat, float(prune))",
        "tests/test_lrp_modern.py::test_relevance_plan_prunes_exactly_the_requested_count_with_ties",
    ),
    (
        "checksum never compared",
        "lightning_xai/quantization/export.py",
        "    if stored != payload_digest(tensors, metadata):",
        "    if False:",
        "tests/test_files.py::test_random_byte_flips_are_all_refused",
    ),
    (
        "architecture not checked before loading",
        "lightning_xai/_loading.py",
        "    check_architecture(model, state, path, shapes)\n",
        "",
        "tests/test_files.py::test_a_narrower_pruned_model_does_not_load_into_a_wider_one",
    ),
    (
        "checkpoints keep the compact parametrized state",
        "lightning_xai/callbacks/self_compression.py",
        "        save_plain_checkpoint(pl_module, checkpoint)",
        "        pass",
        "tests/test_reload.py::test_load_from_checkpoint_during_and_after_self_compression",
    ),
    (
        "ddp_spawn hands back the compact weights",
        "lightning_xai/callbacks/cswap_pruning.py",
        "        plain_weights_for_spawn(trainer, pl_module)",
        "        pass",
        "tests/test_reload.py::test_ddp_spawn_with_cswap_pruning",
    ),
    (
        "restored channels keep the full penalty",
        "lightning_xai/callbacks/preservation_guard.py",
        "                    q.relief.masked_fill_(mask, self.restored_penalty)",
        "                    pass",
        "tests/test_safety.py::test_restored_channels_are_relieved_of_the_size_penalty",
    ),
    (
        "penalty scaled by the accumulation",
        "lightning_xai/callbacks/self_compression.py",
        "            self.compressor.add_penalty_gradients()",
        "            self.compressor.add_penalty_gradients(scale=trainer.accumulate_grad_batches)",
        "tests/test_callback.py::test_penalty_gradient_is_added_once_per_optimizer_step_whatever_the_accumulation",
    ),
    (
        "guard check logs nothing",
        "lightning_xai/callbacks/preservation_guard.py",
        '        metrics["compression/restorations"] = float(len(self.restorations))\n        log_scalars(trainer, metrics, step)',
        '        metrics["compression/restorations"] = float(len(self.restorations))',
        "tests/test_preservation.py::test_guard_prevents_collapse_and_logs",
    ),
    (
        "guard never restores with the mixin",
        "lightning_xai/callbacks/preservation_guard.py",
        "        if acc >= self.threshold:\n",
        "        if True:\n",
        "tests/test_preservation.py::test_guard_works_with_the_mixin",
    ),
    (
        "bypass keeps the batch norm",
        "lightning_xai/pruning/layer_pruning.py",
        "                for member in able[name]:",
        "                for member in able[name][:1]:",
        "tests/test_layer_attribution.py::test_bypass_keeps_outputs_and_removes_modules_on_torchvision_models",
    ),
    (
        "export writes straight to the target",
        "lightning_xai/quantization/export.py",
        "save_file(tensors, tmp, metadata=metadata)",
        "save_file(tensors, str(path), metadata=metadata)",
        "tests/test_safety.py::test_interrupted_export_leaves_the_existing_file_byte_identical",
    ),
    (
        "no chmod (mode 0600)",
        "lightning_xai/quantization/export.py",
        "        os.chmod(tmp, 0o666 & ~_umask())\n",
        "",
        "tests/test_safety.py::test_exports_follow_the_umask_and_are_flushed_before_the_rename",
    ),
    (
        "no fsync of the file",
        "lightning_xai/quantization/export.py",
        "            os.fsync(handle.fileno())",
        "            pass",
        "tests/test_safety.py::test_exports_follow_the_umask_and_are_flushed_before_the_rename",
    ),
    (
        "batch-norm gate does nothing",
        "lightning_xai/quantization/install.py",
        "            gate.set_quantizer(quantizer)\n        _GATES[bn] = (quantizer, None)",
        "            gate.set_quantizer(None)\n        _GATES[bn] = (quantizer, None)",
        "tests/test_surgery.py::test_batchnorm_gate_zeroes_dead_channels_with_nonzero_beta_and_running_stats",
    ),
    (
        "apply_plan zeroes the last channel of a unit left with one",
        "lightning_xai/pruning/units.py",
        "        if len(chs) >= by_name[name].size:",
        "        if len(chs) >= by_name[name].size - 1:",
        "tests/test_safety.py::test_a_plan_that_leaves_one_channel_keeps_it_alive",
    ),
    (
        "guard set from the validation split",
        "lightning_xai/callbacks/preservation_guard.py",
        'dataset = split_dataset(trainer, "train", "PreservationGuard")',
        'dataset = split_dataset(trainer, "val", "PreservationGuard")',
        "tests/test_safety.py::test_the_set_indexes_the_training_split_with_the_documented_size",
    ),
    (
        "restore every channel of a layer",
        "lightning_xai/callbacks/preservation_guard.py",
        "        mask = b_now < b_snap\n",
        "        mask = torch.ones_like(b_now < b_snap)\n",
        "tests/test_safety.py::test_restoration_touches_only_channels_that_lost_bits",
    ),
    (
        "end-of-training rollback disabled",
        "lightning_xai/callbacks/preservation_guard.py",
        "if acc < self.threshold and self.rollback_at_end",
        "if False and acc < self.threshold and self.rollback_at_end",
        "tests/test_safety.py::test_forced_end_of_training_rollback",
    ),
    (
        "protected_channels returns nothing",
        "lightning_xai/callbacks/preservation_guard.py",
        '        """Channels alive in the last healthy snapshot: they may be restored, so they must not be removed."""\n        return {',
        '        """Channels alive in the last healthy snapshot: they may be restored, so they must not be removed."""\n        return {}\n        return {',
        "tests/test_safety.py::test_a_protected_channel_survives_removal_and_can_be_restored",
    ),
    (
        "snapshot not re-aligned after a removal",
        "lightning_xai/callbacks/preservation_guard.py",
        "        for layer, idxs in report.removed_idxs.items():",
        "        for layer, idxs in {}.items():",
        "tests/test_safety.py::test_the_snapshot_shrinks_with_removals_and_a_later_restore_still_works",
    ),
    (
        "bits never freeze",
        "lightning_xai/callbacks/self_compression.py",
        "                self._freeze_step = self.freeze_bits_after * total",
        "                self._freeze_step = float('inf')",
        "tests/test_safety.py::test_freeze_bits_after_half_of_the_steps_stops_b_and_e",
    ),
    (
        "cswap baseline not updated after a removal",
        "lightning_xai/pruning/cswap.py",
        "                        sigma = stars[j]\n",
        "",
        "tests/test_safety.py::test_the_baseline_follows_each_removal",
    ),
    (
        "critical tail sorted the wrong way",
        "lightning_xai/pruning/cswap.py",
        "    critical.sort(key=lambda t: -t[0])",
        "    critical.sort(key=lambda t: t[0])",
        "tests/test_safety.py::test_cswap_order_equals_an_independent_algorithm_1",
    ),
]


def main(selected: list[str]) -> int:
    missed = 0
    for i, (title, path, old, new, test) in enumerate(MUTANTS):
        if selected and str(i) not in selected:
            continue
        p = ROOT / path
        orig = p.read_text()
        if orig.count(old) != 1:
            print(f"[{i}] {title}: PATTERN NOT FOUND ({orig.count(old)} matches) - update this entry")
            missed += 1
            continue
        p.write_text(orig.replace(old, new))
        try:
            r = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", test], cwd=ROOT, capture_output=True, text=True
            )
        finally:
            p.write_text(orig)
        caught = r.returncode != 0
        missed += not caught
        print(f"[{i}] {title}: {'CAUGHT' if caught else 'MISSED'} by {test}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
