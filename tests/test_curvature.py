"""Curvature and patching: lines, circles, random walks, exact patches; then smollm2 edits against Hugging Face."""
import math

import numpy as np
import pytest
import torch

import lensdyn as ld
from lensdyn.analyses import curvature
from lensdyn.errors import ArgumentError, PromptError
from lensdyn.fastpath import fast_paths
from lensdyn.hooks import patching
from lensdyn.hooks.patching import align, last_logits, patch_sweep, patch_sweeps
from lensdyn.analyses.curvature import EDIT_PAIRS


def test_a_straight_line_has_no_turns_and_length_to_chord_one():
    line = torch.linspace(0, 1, 12, dtype=torch.float64)[:, None] * torch.randn(64, dtype=torch.float64)
    np.testing.assert_allclose(curvature.turning_angles(line).numpy(), 0.0, atol=1e-5)
    assert curvature.length_to_chord(line).item() == pytest.approx(1.0)


def test_a_planar_circle_turns_by_its_constant_step_angle():
    """Points k * 15 degrees round a circle, embedded in 10 dimensions: every turn is 15 degrees."""
    t = torch.deg2rad(torch.arange(0, 181, 15, dtype=torch.float64))
    basis, _ = torch.linalg.qr(torch.randn(10, 2, dtype=torch.float64))
    circle = torch.stack([t.cos(), t.sin()], dim=1) @ basis.T
    np.testing.assert_allclose(curvature.turning_angles(circle).numpy(), 15.0, atol=1e-9)
    # 12 chords of a half circle over its diameter: 12 * 2 sin(7.5 deg) / 2
    assert curvature.length_to_chord(circle).item() == pytest.approx(12 * math.sin(math.radians(7.5)))


def test_a_high_dimensional_random_walk_turns_by_ninety_degrees():
    g = torch.Generator().manual_seed(0)
    steps = torch.randn(30, 200, 576, generator=g, dtype=torch.float64)
    walk = torch.cumsum(torch.cat([torch.zeros(1, 200, 576, dtype=torch.float64), steps]), dim=0)
    angles = curvature.turning_angles(walk)
    assert angles.mean().item() == pytest.approx(90.0, abs=0.2)
    assert angles.std().item() == pytest.approx(math.degrees(1 / math.sqrt(576)), rel=0.05)


def test_nulls_keep_step_lengths_and_the_shuffle_keeps_the_chord():
    g = torch.Generator().manual_seed(1)
    steps = torch.randn(10, 50, 32, generator=g) * torch.linspace(1, 5, 10)[:, None, None]
    for kind in ("walk", "shuffle"):
        null = curvature.null_steps(steps, kind, g)
        torch.testing.assert_close(null.norm(dim=-1).sort(0).values, steps.norm(dim=-1).sort(0).values)
    shuffled = curvature.null_steps(steps, "shuffle", g)
    torch.testing.assert_close(shuffled.sum(0), steps.sum(0), atol=1e-4, rtol=1e-5)


def test_a_smooth_curve_is_flatter_than_the_walk_null_and_a_walk_matches_it():
    """A circle turns 15 degrees per step: every angle is flat, none in a high-dimensional walk with its step lengths."""
    t = torch.deg2rad(torch.arange(0, 271, 15, dtype=torch.float64))
    basis, _ = torch.linalg.qr(torch.randn(64, 2, dtype=torch.float64))
    circles = (torch.stack([t.cos(), t.sin()], dim=1) @ basis.T)[:, None, :].expand(-1, 20, -1)
    comparisons = {(c.statistic, c.null): c for c in curvature.compare_with_nulls(circles, n_draws=10)}
    assert comparisons["mean_angle", "walk"].observed == pytest.approx(15.0)
    assert comparisons["mean_angle", "walk"].p_value == 1.0  # not more bent than the null
    assert comparisons["flat_fraction", "walk"].observed == 1.0 and comparisons["flat_fraction", "walk"].null_mean == 0.0
    chord = comparisons["length_to_chord", "shuffle"]
    assert chord.null_mean == pytest.approx(chord.observed)  # the same steps in any order end at the same point
    g = torch.Generator().manual_seed(2)
    walk = torch.cumsum(torch.randn(20, 40, 64, generator=g, dtype=torch.float64), dim=0)
    walk_vs_null = {(c.statistic, c.null): c for c in curvature.compare_with_nulls(walk, n_draws=10)}
    assert abs(walk_vs_null["mean_angle", "walk"].effect_size) < 4


def test_step_coordinates_keep_every_inner_product_and_statistic():
    """k steps in 576 dimensions -> k coordinates: the same Gram matrix, angles and statistics, also for dependent steps."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.logspace(-2, 2, 30, dtype=torch.float64)[:, None, None]
    steps = torch.randn(30, 40, 576, generator=g, dtype=torch.float64) * lengths
    for token, rank in ((0, 2), (1, 5)):  # steps in a plane, in 5 dimensions: a singular Gram matrix
        steps[:, token] = torch.randn(30, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, 576, generator=g,
                                                                                              dtype=torch.float64)
    coords = curvature.step_coordinates(steps)
    assert coords.shape == (30, 40, 30) and coords.dtype == torch.float64
    gram, coord_gram = (torch.einsum("itd,jtd->tij", x, x) for x in (steps, coords))
    scale = gram.diagonal(dim1=1, dim2=2).sqrt()
    np.testing.assert_allclose(((coord_gram - gram) / (scale[:, :, None] * scale[:, None, :])).numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(curvature._angle(coords[:-1], coords[1:]).numpy(),
                               curvature._angle(steps[:-1], steps[1:]).numpy(), atol=1e-9)
    full, reduced = curvature.step_statistics(steps), curvature.step_statistics(coords)
    for name in full:
        assert reduced[name] == pytest.approx(full[name], abs=1e-9, rel=1e-9)
    few = steps[:, :, :20]  # fewer dimensions than steps: nothing to reduce
    torch.testing.assert_close(curvature.step_coordinates(few), few, atol=0, rtol=0)


def test_the_bartlett_walk_turns_like_an_isotropic_walk_in_576_dimensions():
    """Independent directions in d = 576: cosines with mean 0 and std 1/sqrt(d) (angles 90 +- 2.4 degrees).

    And the squared chord of independent steps has mean sum_i l_i^2.
    """
    g = torch.Generator().manual_seed(4)
    lengths = torch.linspace(0.5, 3.0, 30, dtype=torch.float64)
    steps = torch.diag(lengths)[:, None, :].expand(30, 2000, 30)  # any coordinates with these lengths
    null = curvature.null_steps(steps, "walk", g, dim=576)
    assert null.shape == steps.shape
    torch.testing.assert_close(null.norm(dim=-1), steps.norm(dim=-1))
    unit = null / null.norm(dim=-1, keepdim=True)
    pairs = torch.triu_indices(30, 30, offset=1)
    cos = torch.einsum("itc,jtc->tij", unit, unit)[:, pairs[0], pairs[1]].flatten()
    assert abs(cos.mean().item()) < 4 / math.sqrt(576) / math.sqrt(cos.numel())  # 4 standard errors
    assert cos.std().item() == pytest.approx(1 / math.sqrt(576), rel=0.02)
    angles = curvature._angle(null[:-1], null[1:])
    assert angles.mean().item() == pytest.approx(90.0, abs=0.1)
    assert angles.std().item() == pytest.approx(math.degrees(1 / math.sqrt(576)), rel=0.03)
    squared_chord = null.sum(0).pow(2).sum(-1)
    assert squared_chord.mean().item() == pytest.approx(float(lengths.pow(2).sum()), rel=4 * squared_chord.std().item()
                                                         / squared_chord.mean().item() / math.sqrt(2000))


def test_the_bartlett_walk_agrees_with_the_gaussian_walk_in_distribution():
    """d = 64, k = 10: statistics of the walk drawn in 10 coordinates vs drawn in 64 dimensions, within 4 standard errors."""
    g = torch.Generator().manual_seed(5)
    lengths = torch.linspace(1, 4, 10, dtype=torch.float64)[:, None, None]
    steps = torch.randn(10, 4000, 64, generator=g, dtype=torch.float64) * lengths
    coords = curvature.step_coordinates(steps)
    plain, bartlett = curvature.null_steps(steps, "walk", g), curvature.null_steps(coords, "walk", g, dim=64)
    for statistic in (lambda x: curvature._angle(x[:-1], x[1:]).flatten(), lambda x: curvature._step_chord(x),
                      lambda x: (curvature._angle(x[:-1], x[1:]) - 90).abs().flatten()):
        a, b = statistic(plain), statistic(bartlett)
        se = math.sqrt(a.var().item() / a.numel() + b.var().item() / b.numel())
        assert abs(a.mean().item() - b.mean().item()) < 4 * se
        assert b.std().item() == pytest.approx(a.std().item(), rel=0.05)


def test_null_steps_refuse_coordinates_that_cannot_hold_the_walk():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ArgumentError, match="smaller than"):
        curvature.null_steps(torch.ones(5, 3, 8), "walk", g, dim=4)
    with pytest.raises(ArgumentError, match="need 5 coordinates"):
        curvature.null_steps(torch.ones(5, 3, 4), "walk", g, dim=64)
    padded = curvature.null_steps(torch.ones(5, 3, 8, dtype=torch.float64), "walk", g, dim=64)  # 5 steps in 8 coordinates
    assert padded[..., 5:].abs().max().item() == 0.0


def test_alignment_handles_different_lengths_and_refuses_the_edited_span():
    a = align([1, 2, 3, 4, 5], [1, 9, 9, 9, 4, 5])
    assert (a.prefix, a.suffix, a.offset) == (1, 2, 1)
    assert a.edited_position(4) == 5 and a.edited_position(0) == 0
    assert a.span() == (range(1, 3), range(1, 4))
    with pytest.raises(PromptError, match="inside the edited span"):
        a.edited_position(2)
    with pytest.raises(PromptError, match="nothing was edited"):
        align([1, 2], [1, 2])


def test_patching_the_clean_state_changes_nothing_and_the_edited_state_reproduces_the_edit(tiny_model):
    g = torch.Generator().manual_seed(0)
    clean, edited = torch.randint(0, 50, (9,), generator=g), torch.randint(0, 50, (9,), generator=g)
    cap = ld.capture(tiny_model, torch.stack([clean, edited]), streams=("resid", "attn_out", "mlp_out"), exclude=())
    clean_logits, edited_logits = last_logits(tiny_model, torch.stack([clean, edited]))
    every = list(range(9))
    same = patch_sweep(tiny_model, clean, cap.resid[:-1, 0], every, every, "resid")
    torch.testing.assert_close(same, clean_logits.expand_as(same), atol=1e-5, rtol=1e-5)
    swapped = patch_sweep(tiny_model, clean, cap.resid[:-1, 1], every, every, "resid")
    torch.testing.assert_close(swapped, edited_logits.expand_as(swapped), atol=1e-5, rtol=1e-5)
    for stream in ("attn_out", "mlp_out"):  # the clean run's own sublayer outputs: a no-op at every block
        own = patch_sweep(tiny_model, clean, getattr(cap, stream)[:, 0], every, every, stream)
        torch.testing.assert_close(own, clean_logits.expand_as(own), atol=1e-5, rtol=1e-5)
    with pytest.raises(ArgumentError, match="stream must be"):
        patch_sweep(tiny_model, clean, cap.resid[:-1, 1], every, every, "ln1")


def test_patch_sweeps_of_prompts_of_different_lengths_equal_one_sweep_each(tiny_model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50, (n,), generator=g) for n in (12, 7, 10)]
    cap = ld.capture(tiny_model, [p.tolist() for p in prompts] * 2, streams=("resid", "mlp_out"), exclude=())
    clean_positions, edited_positions = [[11], [3, 6], [9]], [[11], [4, 6], [8]]
    for stream in ("resid", "mlp_out"):
        acts = cap.resid[:-1] if stream == "resid" else cap.mlp_out
        edited = [acts[:, 3 + i, : len(p)] for i, p in enumerate(prompts)]  # another prompt's run, at aligned positions
        one_each = torch.stack([patch_sweep(tiny_model, p, e, c, d, stream)
                                for p, e, c, d in zip(prompts, edited, clean_positions, edited_positions)])
        together = patch_sweeps(tiny_model, prompts, edited, clean_positions, edited_positions, stream)
        torch.testing.assert_close(together, one_each, atol=1e-5, rtol=1e-5)
    with pytest.raises(ArgumentError, match="one item per prompt"):
        patch_sweeps(tiny_model, prompts, edited[:2], clean_positions, edited_positions)


def test_last_logits_equal_the_full_forward(tiny_model):
    ids = torch.randint(0, 50, (3, 11))
    with torch.inference_mode():
        full = tiny_model(ids)[:, -1]
    torch.testing.assert_close(last_logits(tiny_model, ids), full, atol=1e-5, rtol=1e-5)


def test_built_in_edit_pairs_are_well_formed():
    kinds = {p.kind for p in EDIT_PAIRS}
    assert kinds == {"meaning", "control"}
    assert len({p.label for p in EDIT_PAIRS}) == len(EDIT_PAIRS)
    for p in EDIT_PAIRS:
        assert p.clean != p.edited and p.clean.split()[-1] == p.edited.split()[-1]
        assert (p.clean_answer == p.edited_answer) == (p.kind == "control")


def test_measure_needs_the_model_and_round_trips_without_pairs(tmp_path, tiny_model):
    cap = ld.capture(tiny_model, torch.randint(0, 50, (3, 12)), streams=("resid",))
    with pytest.raises(ArgumentError, match="needs model="):
        curvature.measure(cap)
    result = curvature.measure(cap, model=tiny_model, control=None, pairs=(), n_draws=5)
    assert [land.angles.shape for land in result.landscapes] == [(2, 11)] * 3
    loaded = ld.load_result(result.to_json(tmp_path / "curvature.json"))
    assert isinstance(loaded.raw[0], curvature.NullComparison)
    assert "length_to_chord" in result.summary()


@pytest.mark.slow
def test_smollm2_deflection_matches_hugging_face_states_and_patches_recover(smollm2, smollm2_reference):
    deflections = curvature._deflections(smollm2, EDIT_PAIRS, ("resid",))  # one capture, every sweep in one batch
    tok = smollm2.tokenizer

    def run(ids, layer=None, state=None):
        """The HF model itself; with ``layer``, its input at the last token replaced by ``state`` (brute force)."""
        def replace(module, args, kwargs):
            hidden = args[0].clone()
            hidden[0, -1] = state
            return (hidden, *args[1:]), kwargs

        handle = None if layer is None else smollm2_reference.model.layers[layer].register_forward_pre_hook(
            replace, with_kwargs=True)
        try:
            with torch.inference_mode():
                return smollm2_reference(torch.tensor([ids]), output_hidden_states=True)
        finally:
            if handle is not None:
                handle.remove()

    checked = 0
    for pair, deflection in zip(EDIT_PAIRS, deflections):
        # The bridge's tokenizer has BOS switched on by TransformerLens; SmolLM2 itself uses none.
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in (pair.clean, pair.edited)]
        if ids[0][-1] != ids[1][-1]:
            continue  # the target's own token differs: no aligned last position to compare by hand
        runs = [run(i) for i in ids]
        c, e = (r.hidden_states[10][0, -1].double() for r in runs)
        angle = math.degrees(math.acos(min(1.0, float(c @ e / (c.norm() * e.norm())))))
        assert deflection.angle[10] == pytest.approx(angle, abs=1e-2)
        if "resid" not in deflection.recovery:
            continue  # a control edit, or one that moves nothing: not patched
        a, b = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (pair.clean_answer, pair.edited_answer))
        logits = [r.logits[0, -1] for r in runs]
        assert deflection.ld_clean == pytest.approx(float(logits[0][a] - logits[0][b]), abs=1e-3)
        for layer in (0, 15, 29):
            patched = run(ids[0], layer, runs[1].hidden_states[layer][0, -1]).logits[0, -1]
            expected = (float(patched[a] - patched[b]) - deflection.ld_clean) / (deflection.ld_edited - deflection.ld_clean)
            assert deflection.recovery["resid"][layer] == pytest.approx(expected, abs=2e-3), (pair.label, layer)
            checked += 1
    assert checked >= 12  # every built-in meaning pair, three blocks each
    assert fast_paths(smollm2)[patching.PREFIX_CACHE].taken


@pytest.mark.slow
def test_smollm2_patch_sweeps_through_the_prefix_cache_equal_whole_prompts(smollm2):
    """Prefixes of different lengths, left-padded into one cache, against every row running its whole prompt."""
    pairs = [p for p in EDIT_PAIRS if p.kind == "meaning"][:3]
    cap = ld.capture(smollm2, [t for p in pairs for t in (p.clean, p.edited)], streams=("resid", "attn_out"), exclude=())
    n = cap.token_mask.sum(1).tolist()
    clean = [cap.tokens[2 * i, : n[2 * i]] for i in range(3)]
    positions = [[n[2 * i] - 1] for i in range(3)], [[n[2 * i + 1] - 1] for i in range(3)]
    for stream, acts in (("resid", cap.resid[:-1]), ("attn_out", cap.attn_out)):
        edited = [acts[:, 2 * i + 1, : n[2 * i + 1]] for i in range(3)]
        cached = patch_sweeps(smollm2, clean, edited, *positions, stream)
        whole = patch_sweeps(smollm2, clean, edited, *positions, stream, prefix_cache=False)
        torch.testing.assert_close(cached, whole, atol=2e-4, rtol=1e-4)
    assert fast_paths(smollm2)[patching.PREFIX_CACHE].taken  # the cached rows were used, not a silent fallback


def test_edit_pairs_outside_the_vocabulary_are_a_clear_error(tiny_llama):
    """A word-level tokenizer knows none of the built-in pairs' words: every token is <unk>, so there is no target."""
    with pytest.raises(PromptError, match="only special tokens"):
        curvature.measure(tiny_llama, ["w3 w4 w5 w6 w7"], control=None, pairs=curvature.EDIT_PAIRS[:1], n_draws=2)
