"""Norms: a synthetic stream with known norms, then smollm2 against raw Hugging Face hidden states."""
import numpy as np
import pytest
import torch

import lensdyn as ld
from conftest import synthetic_capture
from lensdyn import ops
from lensdyn.analyses import norms


def test_known_exponential_growth_and_an_excluded_sink():
    """Norms a_l = exp(0.3 l) on every token but position 0, which carries 1000: the mean is a_l."""
    n_states, n_prompts, n_pos, d = 6, 2, 5, 16
    growth = torch.exp(0.3 * torch.arange(n_states, dtype=torch.float64))
    directions = torch.nn.functional.normalize(torch.randn(n_prompts, n_pos, d, dtype=torch.float64), dim=-1)
    resid = growth[:, None, None, None] * directions
    resid[:, :, 0] *= 1000.0
    token_mask = torch.ones(n_prompts, n_pos, dtype=torch.bool)
    token_mask[1, 3:] = False  # prompt 1 is padded after 3 tokens
    resid[:, 1, 3:] = 0.0
    result = norms.measure(synthetic_capture(token_mask, resid=resid.float()))
    np.testing.assert_allclose(result.mean, growth.numpy(), rtol=1e-6)
    np.testing.assert_allclose(result.std, 0.0, atol=1e-5)
    np.testing.assert_allclose(result.median, growth.numpy(), rtol=1e-6)
    np.testing.assert_allclose(result.prompt_mean, np.stack([growth.numpy()] * 2), rtol=1e-6)
    np.testing.assert_allclose(result.first_position_mean, 1000 * growth.numpy(), rtol=1e-6)
    assert result.provenance.n_tokens == 4 + 2
    # Keeping position 0 in drags the mean up by orders of magnitude: why it is excluded by default.
    kept = norms.measure(synthetic_capture(token_mask, exclude=(), resid=resid.float()))
    assert np.all(kept.mean > 100 * result.mean)


def test_summary_and_figure():
    resid = torch.randn(4, 2, 6, 8)
    result = norms.measure(synthetic_capture(torch.ones(2, 6, dtype=torch.bool), resid=resid))
    assert len(result.summary().splitlines()) == 2 + 4 + 1
    fig = result.figure(control=result)
    names = [t.name for t in fig.data]
    assert sum("mean" in n for n in names) == 2 and sum("position 0 (excluded)" in n for n in names) == 2
    assert fig.layout.yaxis.type == "log"


def test_no_tokens_left_is_an_error():
    token_mask = torch.zeros(1, 3, dtype=torch.bool)
    token_mask[0, 0] = True  # only position 0, which is excluded
    with pytest.raises(ValueError, match="no tokens left"):
        norms.measure(synthetic_capture(token_mask, resid=torch.randn(2, 1, 3, 4)))


def test_shapes_are_checked_at_run_time():
    """The suite runs with jaxtyping + beartype: a wrong shape or dtype fails loudly."""
    from jaxtyping import TypeCheckError

    with pytest.raises(TypeCheckError):
        ops.masked_mean(torch.ones(2, 3, 4), torch.ones(4, 3, dtype=torch.bool))  # batch 3 vs 4
    with pytest.raises(TypeCheckError):
        ops.token_norms(torch.ones(2, 3, dtype=torch.long))


@pytest.mark.slow
def test_smollm2_norms_equal_norms_of_hugging_face_hidden_states(smollm2_diverse, smollm2_reference):
    """Mean norms from the capture vs a loop over prompts through plain transformers."""
    cap = smollm2_diverse
    result = norms.measure(cap)
    pooled = [[] for _ in range(cap.n_layers)]
    with torch.inference_mode():
        for i in range(cap.n_prompts):
            n = int(cap.token_mask[i].sum())
            hidden = smollm2_reference(cap.tokens[i : i + 1, :n], output_hidden_states=True).hidden_states
            for l in range(cap.n_layers):  # HF's last entry is post-norm: not a layer
                pooled[l].append(hidden[l][0, 1:].double().norm(dim=-1))
    reference = np.array([torch.cat(p).mean().item() for p in pooled])
    np.testing.assert_allclose(result.mean[:-1], reference, rtol=1e-5)
    assert result.provenance.model == "smollm2-135m" and result.provenance.n_tokens == cap.n_tokens


@pytest.mark.slow
def test_untrained_post_norm_encoder_has_norm_sqrt_d_at_every_state():
    """Fresh LayerNorms have gain 1 and bias 0, so every BERT state is a zero-mean, unit-variance vector:
    ||x|| = sqrt(d_model * var / (var + eps)) ~ sqrt(384)."""
    control = ld.load_model("minilm-l6", weights="random", seed=0)
    result = norms.measure(control, "diverse", exclude=())
    np.testing.assert_allclose(result.mean, np.sqrt(384), rtol=1e-4)
    np.testing.assert_allclose(result.q05, np.sqrt(384), rtol=1e-4)


def test_an_empty_mask_is_a_lensdyn_error_the_cli_reports_in_one_line():
    from lensdyn.errors import LensdynError
    from lensdyn.ops import aggregate_ratio

    with pytest.raises(LensdynError, match="no tokens left after masking"):
        aggregate_ratio(torch.ones(2, 0, dtype=torch.float64), torch.ones(2, 0, dtype=torch.float64))
