"""Capture: residual identities, agreement with raw Hugging Face hidden states, padding, masks, errors."""
import pytest
import torch

import lensdyn as ld
from lensdyn.errors import (
    ArgumentError,
    NonFiniteActivationError,
    PromptError,
    PromptTooLongError,
)

IDS = [[1, 5, 7, 9, 11, 13, 2, 4, 6, 8], [3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1]]


def assert_pre_norm_identities(cap, atol=0.0):
    """resid_pre + attn_out == resid_mid and resid_mid + mlp_out == resid_post, every block, real tokens."""
    m = cap.token_mask
    for l in range(cap.n_layers):
        torch.testing.assert_close((cap.resid[l] + cap.attn_out[l])[m], cap.resid_mid[l][m], atol=atol, rtol=0)
        torch.testing.assert_close((cap.resid_mid[l] + cap.mlp_out[l])[m], cap.resid[l + 1][m], atol=atol, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_gqa_model"])
def test_pre_norm_identities_on_tiny_models(fixture, request):
    cap = ld.capture(request.getfixturevalue(fixture), IDS)
    assert cap.resid.shape == (4, 3, 10, 32)
    assert cap.attn_out.shape == cap.mlp_out.shape == cap.resid_mid.shape == (3, 3, 10, 32)
    assert_pre_norm_identities(cap)


def test_sublayer_inputs_are_the_norm_outputs_with_their_gain(tiny_model):
    """Pre-norm: attn_in = ln1(resid) and mlp_in = ln2(resid_mid), gain and bias included."""
    cap = ld.capture(tiny_model, IDS)
    m = cap.token_mask
    for l in range(3):
        ln1, ln2 = tiny_model.blocks[l].ln1, tiny_model.blocks[l].ln2
        torch.testing.assert_close(cap.attn_in[l][m], (cap.ln1_normalized[l] * ln1.w + ln1.b)[m], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cap.mlp_in[l][m], (cap.ln2_normalized[l] * ln2.w + ln2.b)[m], atol=1e-5, rtol=1e-5)


def test_batched_capture_with_padding_equals_per_prompt(tiny_gqa_model):
    batched = ld.capture(tiny_gqa_model, IDS, batch_size=3)
    for i, ids in enumerate(IDS):
        single = ld.capture(tiny_gqa_model, [ids])
        n = len(ids)
        for stream in ld.STREAMS:
            torch.testing.assert_close(getattr(batched, stream)[:, i, :n], getattr(single, stream)[:, 0], atol=1e-5, rtol=1e-5)


def test_prompt_order_is_kept_when_batches_are_sorted_by_length(tiny_model):
    one_by_one = ld.capture(tiny_model, IDS, batch_size=1)
    together = ld.capture(tiny_model, IDS, batch_size=2)
    assert torch.equal(one_by_one.tokens, together.tokens)
    torch.testing.assert_close(one_by_one.resid, together.resid, atol=1e-5, rtol=1e-5)


def test_masks_mark_padding_and_excluded_positions(tiny_model):
    cap = ld.capture(tiny_model, IDS)
    assert cap.token_mask.sum(1).tolist() == [10, 5, 7]
    assert not cap.mask[:, 0].any()
    assert torch.equal(cap.mask[:, 1:], cap.token_mask[:, 1:])
    assert cap.n_tokens == 22 - 3
    assert ld.capture(tiny_model, IDS, exclude=()).n_tokens == 22


def test_streams_subset_and_require(tiny_model):
    cap = ld.capture(tiny_model, IDS, streams=("resid",))
    assert cap.attn_out is None and cap.resid is not None
    assert "resid=(4, 22, 32)" in repr(cap) and "attn_out" not in repr(cap)  # packed: 22 real tokens
    with pytest.raises(ArgumentError, match="attn_out"):
        cap.require("attn_out")
    with pytest.raises(ArgumentError, match="unknown stream"):
        ld.capture(tiny_model, IDS, streams=("resid", "logits"))


def test_attention_patterns_are_causal_distributions(tiny_model):
    cap = ld.capture(tiny_model, IDS, attention=True)
    assert cap.attention.shape == (3, 3, 4, 10, 10)
    n = 5  # prompt 1 has 5 real tokens
    rows = cap.attention[:, 1, :, :n, :n]
    torch.testing.assert_close(rows.sum(-1), torch.ones_like(rows.sum(-1)))
    assert torch.all(torch.triu(rows, diagonal=1) == 0)


def test_hooks_are_removed_after_capture_and_after_an_error(tiny_model):
    def n_hooks():
        return sum(len(h._forward_hooks) for h in tiny_model.hook_dict.values())

    ld.capture(tiny_model, IDS)
    assert n_hooks() == 0
    with pytest.raises(PromptTooLongError):
        ld.capture(tiny_model, [list(range(1, 40))])
    assert n_hooks() == 0


def test_nan_activation_names_the_layer_and_hook():
    from conftest import tiny_bridge

    model = tiny_bridge()
    with torch.no_grad():
        model.blocks[1].mlp.out.weight.fill_(float("nan"))  # [d_model, d_mlp] weight of block 1's MLP out
    with pytest.raises(NonFiniteActivationError, match=r"blocks\.1\.hook_mlp_out \(layer 1\)") as err:
        ld.capture(model, IDS)
    assert err.value.prompt_indices == [0]  # the longest prompt runs first, alone in its batch, and fails first


def test_too_long_prompt_errors_unless_truncation_is_explicit(tiny_model):
    long = list(range(1, 41))  # n_ctx is 32
    with pytest.raises(PromptTooLongError, match="40 tokens.*context is 32.*truncate=True"):
        ld.capture(tiny_model, [IDS[0], long])
    cap = ld.capture(tiny_model, [IDS[0], long], truncate=True)
    assert cap.truncated == (1,)
    assert cap.tokens.shape == (2, 32)
    assert cap.tokens[1].tolist() == long[:32]


@pytest.mark.parametrize("bad", [[], [[]], torch.zeros(0, 3, dtype=torch.long)])
def test_empty_inputs_are_errors(tiny_model, bad):
    with pytest.raises(PromptError):
        ld.capture(tiny_model, bad)


def test_text_prompts_need_a_tokenizer(tiny_model):
    with pytest.raises(PromptError, match="no tokenizer"):
        ld.capture(tiny_model, "hello")


def test_bad_options_are_errors(tiny_model):
    with pytest.raises(ArgumentError, match="exclude"):
        ld.capture(tiny_model, IDS, exclude=("last",))
    with pytest.raises(ArgumentError, match="batch_size"):
        ld.capture(tiny_model, IDS, batch_size=0)
    tiny_model.train()
    with pytest.raises(ArgumentError, match="training mode"):
        ld.capture(tiny_model, IDS)


# --- smollm2-135m: the embedded decoder ---------------------------------------------------------


@pytest.mark.slow
def test_smollm2_identities_on_every_block(smollm2_diverse):
    assert smollm2_diverse.resid.shape[0] == 31
    assert_pre_norm_identities(smollm2_diverse)


@pytest.mark.slow
def test_smollm2_resid_equals_hugging_face_hidden_states(smollm2_diverse, smollm2_reference):
    cap = smollm2_diverse
    i = cap.prompts.labels.index("prose-long")
    n = int(cap.token_mask[i].sum())
    with torch.inference_mode():
        out = smollm2_reference(cap.tokens[i : i + 1, :n], output_hidden_states=True)
    hidden = out.hidden_states
    L = cap.n_layers
    # The capture ran this prompt in a padded batch; batched matmuls reorder float32 sums (~1e-4
    # on entries whose RMS grows to ~10).
    for l in range(L):
        torch.testing.assert_close(cap.resid[l, i, :n], hidden[l][0], atol=1e-3, rtol=1e-4)
    # HF's last entry is post-final-norm: it is the final norm applied to our last state, and far from it.
    last = cap.resid[L, i, :n]
    with torch.inference_mode():
        torch.testing.assert_close(smollm2_reference.model.norm(last), hidden[L][0], atol=1e-3, rtol=1e-4)
    gap = (last - hidden[L][0]).norm(dim=-1) / last.norm(dim=-1)
    assert gap.min() > 0.5, "the pre-norm output should differ from HF's post-norm last hidden state"


@pytest.mark.slow
def test_smollm2_batched_equals_per_prompt(smollm2, smollm2_diverse):
    cap = smollm2_diverse
    for label in ("prose-short", "latex"):
        i = cap.prompts.labels.index(label)
        single = ld.capture(smollm2, [cap.prompts.texts[i]], streams=("resid", "mlp_out"))
        n = single.tokens.shape[1]
        assert torch.equal(single.tokens[0], cap.tokens[i, :n])
        torch.testing.assert_close(cap.resid[:, i, :n], single.resid[:, 0], atol=2e-3, rtol=1e-4)
        torch.testing.assert_close(cap.mlp_out[:, i, :n], single.mlp_out[:, 0], atol=2e-3, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_post_norm_views(smollm2, smollm2_diverse):
    """RMSNorm: normalised * scale is the residual, and mean(normalised^2) = ms / (ms + eps), ms = mean(x^2)."""
    cap, m, eps = smollm2_diverse, smollm2_diverse.token_mask, smollm2.cfg.eps
    for l in (0, 15, 29):
        x, normalized, scale = cap.resid[l][m], cap.ln1_normalized[l][m], cap.ln1_scale[l][m]
        torch.testing.assert_close(normalized * scale[:, None], x, atol=1e-4, rtol=1e-4)
        ms = x.double().pow(2).mean(-1)
        torch.testing.assert_close(normalized.double().pow(2).mean(-1), ms / (ms + eps), atol=1e-5, rtol=1e-5)
        mid = cap.ln2_normalized[l][m] * cap.ln2_scale[l][m][:, None]
        torch.testing.assert_close(mid, cap.resid_mid[l][m], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_has_no_bos_by_default_and_exclusion_rules(smollm2, smollm2_diverse):
    """TransformerLens turns BOS on for every tokenizer; the checkpoint's own tokenizer adds none."""
    cap = smollm2_diverse
    assert smollm2.lensdyn_info.prepend_bos is False
    assert cap.str_tokens[0][0] == "The"
    assert "".join(cap.str_tokens[0]) == cap.prompts.texts[0]
    assert not cap.mask[:, 0].any()
    with_bos = ld.capture(smollm2, ["A short text."], prepend_bos=True, exclude=("bos",), streams=("resid",))
    bos = smollm2.tokenizer.bos_token_id
    assert with_bos.tokens[0, 0] == bos and with_bos.tokens[0, 1:].ne(bos).all()
    assert with_bos.mask[0].tolist() == [False] + [True] * (with_bos.tokens.shape[1] - 1)


# --- minilm-l6: the embedded post-norm BERT encoder -----------------------------------------------


@pytest.mark.slow
def test_minilm_post_norm_capture_matches_hugging_face(minilm, minilm_reference):
    texts = ["The river rose to the fourth step.", "Snow fell on the quiet village all night long, and nobody went out."]
    cap = ld.capture(minilm, texts, exclude=("special",))
    assert cap.model_info.layout == "post-norm"
    assert not cap.mask[:, 0].any(), "[CLS] is special"
    assert cap.tokens[0, cap.token_mask[0].sum() - 1] == minilm.tokenizer.sep_token_id
    m = cap.token_mask
    with torch.inference_mode():
        hidden = minilm_reference(cap.tokens, attention_mask=m.long(), output_hidden_states=True).hidden_states
        for l in range(cap.n_layers + 1):
            torch.testing.assert_close(cap.resid[l][m], hidden[l][m], atol=1e-4, rtol=1e-5)
        for l, layer in enumerate(minilm_reference.bert.encoder.layer):
            ln1, ln2 = layer.attention.output.LayerNorm, layer.output.LayerNorm
            torch.testing.assert_close(ln1(cap.resid[l] + cap.attn_out[l])[m], cap.resid_mid[l][m], atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(ln2(cap.resid_mid[l] + cap.mlp_out[l])[m], cap.resid[l + 1][m], atol=1e-4, rtol=1e-5)
    # A post-norm block reads its residual directly: attention the state between blocks, the MLP LN1's output.
    torch.testing.assert_close(cap.attn_in, cap.resid[:-1])
    torch.testing.assert_close(cap.mlp_in, cap.resid_mid)


def test_capture_record_checks_its_shapes():
    """Capture is shape-checked at construction: by jaxtyping + beartype (padded fields), and by its own
    check that every packed stream holds one row per real token."""
    from jaxtyping import TypeCheckError

    from lensdyn.hooks.capture import Capture
    from lensdyn.models import ModelInfo
    from lensdyn.prompts import PromptSet

    common = dict(
        tokens=torch.zeros(2, 5, dtype=torch.long),
        mask=torch.ones(2, 5, dtype=torch.bool),
        str_tokens=(),
        prompts=PromptSet.from_texts(["a", "b"]),
        model_info=ModelInfo("m", "pretrained", 0, "float32", "none", "pre-norm"),
        exclude=(),
        truncated=(),
        n_layers=1,
    )
    with pytest.raises(TypeCheckError):
        Capture(token_mask=torch.ones(3, 5, dtype=torch.bool), **common)  # 3 prompts where tokens has 2
    with pytest.raises(ArgumentError, match="10 real tokens"):
        Capture(token_mask=torch.ones(2, 5, dtype=torch.bool), packed={"resid": torch.zeros(2, 9, 8)}, **common)
    with pytest.raises(ArgumentError, match="batch and pos"):
        Capture.from_padded(token_mask=torch.ones(2, 5, dtype=torch.bool), resid=torch.zeros(2, 3, 5, 8), **common)


def test_packed_streams_match_the_padded_views(smollm2):
    """Prompts of different lengths: the packed stream is the padded one at the real tokens, and the accessors agree."""
    from lensdyn.ops import masked_tokens

    prompts = ["One two three four five six seven.", "Short.", "A middle one here."]
    cap = ld.capture(smollm2, prompts, streams=("resid", "mlp_out"))
    assert cap.packed["resid"].shape == (cap.n_layers + 1, int(cap.token_mask.sum()), smollm2.cfg.d_model)
    for stream in ("resid", "mlp_out"):
        padded = cap.require(stream)
        assert torch.equal(cap.tokens_of(stream), masked_tokens(padded, cap.mask))
        assert torch.equal(cap.tokens_of(stream, cap.token_mask), cap.packed[stream])
        assert not padded[:, ~cap.token_mask].any()  # zeros at padding
        for p, n in enumerate(cap.lengths):
            assert torch.equal(cap.prompt_of(stream, p), padded[:, p, :n])
            assert torch.equal(cap.tokens_of(stream, prompt=p), padded[:, p][:, cap.mask[p]])
    norms = cap.pad(cap.packed["resid"].norm(dim=-1))
    assert torch.equal(norms, cap.resid.norm(dim=-1))


@pytest.mark.slow
def test_smollm2_forward_is_intact_after_a_capture(smollm2, smollm2_reference):
    """The capture stops the pass early from inside a hook; the bridge must be unharmed for the next call."""
    tokens = torch.tensor([[504, 3045, 8326, 1686, 28, 260, 2378]])
    ld.capture(smollm2, tokens, streams=("resid",))
    with torch.inference_mode():
        torch.testing.assert_close(smollm2(tokens), smollm2_reference(tokens).logits, atol=1e-3, rtol=1e-4)


def test_missing_hook_points_fail_before_any_forward_pass(tiny_model, monkeypatch):
    import importlib

    from lensdyn.errors import UnsupportedArchitectureError

    capture_module = importlib.import_module("lensdyn.hooks.capture")  # the package re-exports the function

    monkeypatch.setattr(capture_module, "_hook_plan", lambda *args: [("blocks.0.hook_not_there", "resid", 0)])
    monkeypatch.setattr(tiny_model, "run_with_hooks", lambda *a, **k: pytest.fail("a forward pass ran"))
    with pytest.raises(UnsupportedArchitectureError, match="blocks.0.hook_not_there"):
        ld.capture(tiny_model, IDS)


def test_a_model_split_over_two_devices_captures_the_same_activations(smollm2, tmp_path):
    """device_map places half the blocks on one device and half on another (on CPU: "cpu" and "disk", accelerate's
    offload); every hook still fires, and the capture equals the one-device model's exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=smollm2.cfg.d_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    split, whole = ld.load_model(str(tmp_path), device_map=device_map), ld.load_model(str(tmp_path))
    assert split.cfg.n_devices == 2
    prompts = ["Hello there, the ships came in at dawn.", "Short one."]
    a, b = (ld.capture(m, prompts, streams=("resid", "attn_out", "mlp_out")) for m in (split, whole))
    for stream in ("resid", "attn_out", "mlp_out"):
        assert torch.equal(a.packed[stream], b.packed[stream])
    with pytest.raises(ArgumentError, match="device or device_map"):
        ld.load_model(str(tmp_path), device="cpu", device_map=device_map)
    with pytest.raises(ArgumentError, match="embedded"):
        ld.load_model("smollm2-135m", device_map=device_map)


def test_capture_with_no_token_left_to_measure_is_an_error(tiny_model):
    with pytest.raises(PromptError, match="no token left to measure"):
        ld.capture(tiny_model, [[7]])
    assert ld.capture(tiny_model, [[7]], exclude=()).mask.sum() == 1
