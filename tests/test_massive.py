"""Massive activations: the rule on planted coordinates, the census, the 'massive' exclusion rule and its control."""
import numpy as np
import pytest
import torch

import lensdyn as ld
from lensdyn.analyses import massive
from lensdyn.errors import ArgumentError
from lensdyn.hooks.capture import control_capture
from lensdyn.ops import massive_mask, median_magnitude

from conftest import synthetic_capture

IDS = [[1, 5, 7, 9, 11, 13, 2, 4, 6, 8], [3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1]]


def planted_states():
    """4 states, 2 prompts of 5 positions (the second 4 long), d_model 16, entries of order 1; two
    massive coordinates: prompt 0 position 0 dim 3 from state 2, prompt 1 position 2 dim 9 from state 1."""
    token_mask = torch.ones(2, 5, dtype=torch.bool)
    token_mask[1, 4] = False
    resid = torch.randn(4, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    resid[2:, 0, 0, 3] = 4000.0
    resid[1:, 1, 2, 9] = -2500.0
    resid[:, 0, 1, 5] = 400.0  # above 100 but about 600x its median: not massive
    return token_mask, resid


def test_massive_mask_is_the_stated_rule_against_numpys_median():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 64, generator=g) * torch.rand(200, 1, generator=g)
    rows, cols = torch.randint(0, 200, (40,), generator=g), torch.randint(0, 64, (40,), generator=g)
    x[rows, cols] = torch.rand(40, generator=g) * 2000
    median = torch.from_numpy(np.median(x.abs().numpy(), axis=-1)).double()
    expected = (x.abs() > 100) & (x.abs().double() >= 1000 * median[:, None])
    assert expected.any() and not expected.all()
    assert torch.equal(massive_mask(x), expected)
    torch.testing.assert_close(median_magnitude(x), median)


def test_massive_mask_bounds_are_hard():
    x = torch.ones(1, 10)
    x[0, 0] = 1000.0  # exactly 1000x the median: massive
    x[0, 1] = 999.0  # 999x: not
    assert massive_mask(x).nonzero().tolist() == [[0, 0]]
    assert not massive_mask(x * 0.1).any()  # 100 is not above the threshold 100
    with pytest.raises(ArgumentError, match="threshold"):
        massive_mask(x, threshold=float("nan"))


def test_census_finds_exactly_the_planted_tokens_dims_and_first_states():
    token_mask, resid = planted_states()
    result = massive.measure(synthetic_capture(token_mask, resid=resid), control=None)
    found = [(c.prompt, c.position, c.dim, c.first_state, c.n_states) for c in result.carriers]
    assert found == [(0, 0, 3, 2, 2), (1, 2, 9, 1, 3)]
    assert result.count.tolist() == [0, 1, 2, 2] and result.carrier_tokens.tolist() == [0, 1, 2, 2]
    assert [c.excluded for c in result.carriers] == [True, False]  # position 0 is out under "first"
    assert result.dims == (3, 9) and result.states_with == (1, 2, 3)
    assert result.top_magnitude[2] == 4000.0 and result.top_dim[2] == 3
    assert (result.top_prompt[2], result.top_position[2]) == (0, 0)
    median = median_magnitude(resid[2, 0, 0]).item()
    assert result.top_ratio[2] == pytest.approx(4000.0 / median)
    assert result.carriers[1].magnitude == 2500.0


def test_census_of_a_state_without_any_reports_its_largest_coordinate():
    token_mask, resid = planted_states()
    resid[:, :, :, :] = torch.linspace(-1, 1, 16)  # the same vector everywhere: top |x| 1, median 0.6
    result = massive.measure(synthetic_capture(token_mask, resid=resid), control=None)
    assert result.count.sum() == 0 and result.carriers == ()
    np.testing.assert_allclose(result.top_magnitude, 1.0)
    np.testing.assert_allclose(result.top_ratio, 1.0 / median_magnitude(torch.linspace(-1, 1, 16)).item())
    assert {v.verdict for v in result.verdicts()[1:]} == {"not testable here"}
    assert result.verdicts()[0].verdict == "does not hold"


def test_delimiters():
    assert [massive.is_delimiter(t) for t in (".", "\n", "", " ", "The", " a.")] == [True, True, True, True, False, False]


def plant(x, hook):
    """Massive coordinates on prompt 0 position 3 and prompt 2 position 6 at block 1's input (with
    batch_size=1 each batch is one prompt, and the prompts' lengths 10, 5, 7 say which)."""
    if x.shape[1] == 10:
        x[0, 3, 5] = 5000.0
    if x.shape[1] == 7:
        x[0, 6, 1] = -3000.0
    return x


@pytest.mark.parametrize("streams", [("resid",), ("mlp_out",)])
def test_the_massive_rule_leaves_out_exactly_the_planted_tokens(tiny_model, streams):
    hooks = [("blocks.1.hook_resid_pre", plant)]
    plain = ld.capture(tiny_model, IDS, streams=streams, fwd_hooks=hooks, batch_size=1)
    cap = ld.capture(tiny_model, IDS, streams=streams, exclude=("first", "massive"), fwd_hooks=hooks, batch_size=1)
    assert cap.massive_positions == ((0, 3), (2, 6)) and cap.massive_source == "native (unknown)"
    expected = plain.mask.clone()
    expected[0, 3] = expected[2, 6] = False
    assert torch.equal(cap.mask, expected)
    assert ld.capture(tiny_model, IDS, streams=streams, exclude=("massive",), batch_size=1).massive_positions == ()


def test_the_control_leaves_out_the_models_massive_positions(tiny_llama):
    prompts = ["w3 w4 w5 w6 w7 w8", "w9 w10 w11"]

    def plant_first_prompt(x, hook):
        if x.shape[1] == 6:
            x[0, 2, 7] = 8000.0
        return x

    cap = ld.capture(tiny_llama, prompts, exclude=("first", "massive"), streams=("resid",), batch_size=1,
                     fwd_hooks=[("blocks.0.hook_resid_pre", plant_first_prompt)])
    assert cap.massive_positions == ((0, 2),)
    control, _ = control_capture(tiny_llama, cap, ("resid",))
    assert control.model_info.weights == "random"
    assert torch.equal(control.mask, cap.mask)
    assert control.massive_positions == ((0, 2),) and control.massive_source == cap.massive_source
    result = massive.measure(cap, model=tiny_llama)
    assert result.provenance.massive_positions == result.control.provenance.massive_positions == ((0, 2),)
    assert result.carriers[0].dim == 7 and result.carriers[0].excluded and result.control.count.sum() == 0


def test_massive_from_must_hold_the_same_tokens(tiny_model):
    cap = ld.capture(tiny_model, IDS, exclude=("massive",), streams=("resid",))
    with pytest.raises(ArgumentError, match="other tokens"):
        ld.capture(tiny_model, IDS[:2], exclude=("massive",), streams=("resid",), massive_from=cap)
    with pytest.raises(ArgumentError, match="must name 'massive'"):
        ld.capture(tiny_model, IDS, streams=("resid",), massive_from=cap)
    without_rule = ld.capture(tiny_model, IDS, streams=("resid",))
    with pytest.raises(ArgumentError, match="found none"):
        ld.capture(tiny_model, IDS, exclude=("massive",), streams=("resid",), massive_from=without_rule)


def test_massive_from_a_future_is_waited_for_after_the_forward_passes_and_checked_the_same(tiny_llama):
    """The report's controls pass the model's capture as a Future: the same mask as the capture itself, its checks
    once it resolves, and a failed model capture fails the control's too."""
    from concurrent.futures import Future

    ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    cap = ld.capture(tiny_llama, ids, exclude=("massive",), streams=("resid",))
    done = Future()
    done.set_result(cap)
    control = ld.capture(tiny_llama, ids, exclude=("massive",), streams=("resid",), massive_from=done)
    assert torch.equal(control.mask, ld.capture(tiny_llama, ids, exclude=("massive",), streams=("resid",),
                                                massive_from=cap).mask)
    assert control.massive_positions == cap.massive_positions and control.massive_source == cap.massive_source
    with pytest.raises(ArgumentError, match="other tokens"):
        ld.capture(tiny_llama, ids[:1], exclude=("massive",), streams=("resid",), massive_from=done)
    with pytest.raises(ArgumentError, match="must name 'massive'"):
        ld.capture(tiny_llama, ids, streams=("resid",), massive_from=done)
    failed = Future()
    failed.set_exception(RuntimeError("the model's capture failed"))
    with pytest.raises(RuntimeError, match="model's capture failed"):
        ld.capture(tiny_llama, ids, exclude=("massive",), streams=("resid",), massive_from=failed)


@pytest.mark.slow
def test_census_on_smollm2_diverse(smollm2_diverse):
    """What the paper's rule finds on smollm2-135m: printed for the record, checked against the raw states."""
    result = massive.measure(smollm2_diverse, control=None)
    print(result.summary())
    states = smollm2_diverse.packed["resid"]
    assert int(result.count.sum()) == int(massive_mask(states).sum())
    np.testing.assert_allclose(result.top_magnitude, states.abs().amax(dim=(1, 2)).double().numpy())


def test_the_command_line_offers_every_exclusion_rule():
    from lensdyn.app.cli import _parser
    from lensdyn.hooks.capture import EXCLUDE_RULES

    parser = _parser()
    for command in ("report", "norms", "corpus"):
        args = parser.parse_args([command, "--out", "x", "--prompts", "diverse", "--exclude", *EXCLUDE_RULES])
        assert args.exclude == list(EXCLUDE_RULES)


@pytest.mark.slow
@pytest.mark.parametrize("order", [[], ["--serial", "--control-seeds", "0"]], ids=["side-by-side", "serial"])
def test_report_excludes_massive_positions_and_its_control_the_models(tmp_path, order):
    from lensdyn.app.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("The lighthouse keeper counted the ships at dawn.\n\nThen he wrote their names down.")
    out = tmp_path / "report"
    assert main(["report", "--analyses", "norms,massive", "--exclude", "first", "massive", "--json-only",
                 "--prompts", str(prompts), "--out", str(out), *order]) == 0
    result = ld.load_result(out / "massive.json")
    assert result.conventions.excluded_positions == ("first", "massive")
    assert result.provenance.massive_source == result.control.provenance.massive_source == "smollm2-135m (pretrained)"
    assert result.control.provenance.massive_positions == result.provenance.massive_positions
    assert ld.load_result(out / "norms.json").provenance.massive_positions == result.provenance.massive_positions
