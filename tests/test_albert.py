"""ALBERT through lensdyn's TransformerLens adapter: one shared layer, one block per depth step.

Known answers come from an independent Hugging Face ``AlbertForMaskedLM`` (eager attention) on
the same tiny random checkpoint: its ``hidden_states``, ``attentions`` and logits, and its own
modules applied by hand.
"""
import pytest
import torch
import transformers
from transformer_lens.model_bridge import TransformerBridge

from conftest import tiny_checkpoint
from lensdyn.adapters import albert, register

CONFIG = dict(
    vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
    embedding_size=32, max_position_embeddings=64,
)
N_LAYERS = CONFIG["num_hidden_layers"]
# Ids 3.. are words of the test tokenizer (0-2 are <unk>, <s>, </s>): two prompts of different lengths.
PROMPTS = [[5, 17, 42, 99, 8, 23, 61, 77, 14], [30, 11, 65, 102, 3, 50]]


def _hf(path, **overrides):
    return transformers.AlbertForMaskedLM.from_pretrained(path, attn_implementation="eager", **overrides).eval()


def _boot(path, **kwargs):
    register()
    return TransformerBridge.boot_transformers(str(path), device="cpu", **kwargs).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("albert"), transformers.AlbertConfig(**CONFIG),
                           transformers.AlbertForMaskedLM)


@pytest.fixture(scope="module")
def bridge(checkpoint):
    return _boot(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return _hf(checkpoint)


@pytest.fixture(scope="module")
def tokens():
    return torch.tensor([PROMPTS[0]])


@pytest.fixture(scope="module")
def hf_out(reference, tokens):
    with torch.no_grad():
        return reference(tokens, output_hidden_states=True, output_attentions=True)


@pytest.fixture(scope="module")
def cache(bridge, tokens):
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens)
    return logits, cache


def test_blocks_unroll_the_shared_layer(bridge):
    assert bridge.cfg.n_layers == len(bridge.blocks) == N_LAYERS
    assert bridge.cfg.d_model == CONFIG["hidden_size"]
    # The encoder runs the unrolled views; the original shared layer stays where it was.
    encoder = bridge.original_model.albert.encoder
    assert isinstance(encoder, albert.UnrolledAlbertTransformer)
    assert len(encoder.albert_layer_groups) == 1


def test_resid_pre_is_hf_hidden_states(cache, hf_out):
    _, cache = cache
    hidden = hf_out.hidden_states
    assert len(hidden) == N_LAYERS + 1
    for layer in range(N_LAYERS):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], hidden[layer], atol=1e-6, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache[f"blocks.{N_LAYERS - 1}.hook_resid_post"], hidden[-1], atol=1e-6, rtol=0)
    # Depth steps really differ: the same map, applied to different states.
    assert (hidden[1] - hidden[2]).abs().max() > 1e-2


def test_weights_are_shared(bridge):
    shared = bridge.original_model.albert.encoder.albert_layer_groups[0].albert_layers[0]
    assert bridge.blocks[0].attn.q.weight is shared.attention.query.weight
    names = [name for name, _ in bridge.blocks[0].named_parameters()]
    assert len(names) == 16  # q, k, v, o, ffn, ffn_output weights and biases; two LayerNorms
    for block in bridge.blocks[1:]:
        params = dict(block.named_parameters())
        assert list(params) == names
        for name, param in bridge.blocks[0].named_parameters():
            assert params[name] is param, name
    # Unrolling adds no parameters: the bridge holds exactly Hugging Face's tensors.
    reference_ids = {id(p) for p in bridge.original_model.albert.encoder.albert_layer_groups.parameters()}
    assert {id(p) for block in bridge.blocks for p in block.parameters()} == reference_ids


def test_weights_stay_shared_through_a_dtype_move(checkpoint):
    model = _boot(checkpoint).to(torch.float64)
    assert model.blocks[0].attn.q.weight.dtype == torch.float64
    for block in model.blocks[1:]:
        assert block.attn.q.weight is model.blocks[0].attn.q.weight
        assert block.ln2.weight is model.blocks[0].ln2.weight
    with torch.no_grad():
        model.blocks[0].mlp.out.bias.add_(1.0)  # one edit reaches every depth step
    assert torch.equal(model.blocks[2].mlp.out.bias, model.blocks[0].mlp.out.bias)


def test_attention_patterns(cache, hf_out):
    _, cache = cache
    patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(N_LAYERS)]
    for layer, pattern in enumerate(patterns):
        assert pattern.shape == (1, CONFIG["num_attention_heads"], len(PROMPTS[0]), len(PROMPTS[0]))
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]), atol=1e-6, rtol=0)
        torch.testing.assert_close(pattern, hf_out.attentions[layer], atol=1e-7, rtol=0)
    # Small random weights make attention nearly uniform, so depth steps differ by ~1e-4: a hundred
    # times the tolerance each step matches Hugging Face's own step to.
    for earlier, later in zip(patterns, patterns[1:]):
        assert (earlier - later).abs().max() > 1e-5


def test_logits_equal_hf(cache, hf_out):
    logits, _ = cache
    assert logits.shape == (1, len(PROMPTS[0]), CONFIG["vocab_size"])
    torch.testing.assert_close(logits, hf_out.logits, atol=1e-5, rtol=0)


def test_sublayer_hooks_against_the_hf_layer(cache, reference):
    """Each block's BERT-named hooks hold what the Hugging Face layer computes at that step."""
    _, cache = cache
    layer = reference.albert.encoder.albert_layer_groups[0].albert_layers[0]
    with torch.no_grad():
        for step in range(N_LAYERS):
            block = f"blocks.{step}"
            pre = cache[f"{block}.hook_resid_pre"]
            written = []
            handle = layer.attention.dense.register_forward_hook(lambda module, args, out: written.append(out))
            try:
                attended = layer.attention(pre)[0]  # LayerNorm(pre + dense(attention))
            finally:
                handle.remove()
            torch.testing.assert_close(cache[f"{block}.ln1.hook_in"], pre + written[0], atol=1e-6, rtol=0)
            torch.testing.assert_close(cache[f"{block}.ln1.hook_out"], attended, atol=1e-6, rtol=0)
            mlp_out = layer.ff_chunk(attended)
            torch.testing.assert_close(cache[f"{block}.hook_mlp_out"], mlp_out, atol=1e-6, rtol=0)
            torch.testing.assert_close(cache[f"{block}.ln2.hook_in"], attended + mlp_out, atol=1e-6, rtol=0)
            torch.testing.assert_close(cache[f"{block}.ln2.hook_out"], cache[f"{block}.hook_resid_post"])
            # As on BERT: the bridge's hook_attn_out is the attention module's output, after LN1.
            torch.testing.assert_close(cache[f"{block}.hook_attn_out"], attended, atol=1e-6, rtol=0)
            for hook in ("ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized"):
                assert f"{block}.{hook}" in cache


def test_hook_names_are_berts(tmp_path, bridge):
    bert_config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, max_position_embeddings=64)
    bert = TransformerBridge.boot_transformers(
        tiny_checkpoint(tmp_path / "bert", bert_config, transformers.BertForMaskedLM), device="cpu"
    )

    def block_hooks(model):
        return {name.removeprefix("blocks.0.") for name in model.hook_dict if name.startswith("blocks.0.")}

    assert block_hooks(bridge) == block_hooks(bert)
    assert {"hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_pattern",
            "ln1.hook_in", "ln1.hook_out", "ln2.hook_in", "ln2.hook_out"} <= block_hooks(bridge)


def test_lensdyn_capture_equals_hf(checkpoint, reference):
    import lensdyn as ld

    register()
    model = ld.load_model(checkpoint)
    assert model.lensdyn_info.layout == "post-norm"
    assert model.lensdyn_info.n_params == reference.num_parameters()
    cap = ld.capture(model, PROMPTS, exclude=(), attention=True)  # two lengths: the short one is padded
    assert cap.resid.shape[0] == N_LAYERS + 1
    layer = reference.albert.encoder.albert_layer_groups[0].albert_layers[0]
    for row, ids in enumerate(PROMPTS):
        n = len(ids)
        with torch.no_grad():
            out = reference(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
        for step in range(N_LAYERS + 1):
            torch.testing.assert_close(cap.resid[step, row, :n], out.hidden_states[step][0], atol=1e-5, rtol=0)
        with torch.no_grad():
            for step in range(N_LAYERS):
                # Post-norm decomposition: mid = LN1(pre + attn_out), post = LN2(mid + mlp_out).
                mid = layer.attention.LayerNorm(cap.resid[step, row, :n] + cap.attn_out[step, row, :n])
                torch.testing.assert_close(cap.resid_mid[step, row, :n], mid, atol=1e-5, rtol=0)
                post = layer.full_layer_layer_norm(cap.resid_mid[step, row, :n] + cap.mlp_out[step, row, :n])
                torch.testing.assert_close(post, out.hidden_states[step + 1][0], atol=1e-5, rtol=0)
                torch.testing.assert_close(cap.attention[step, row, :, :n, :n], out.attentions[step][0], atol=1e-5, rtol=0)


def test_iterating_any_block_is_the_depth_recursion(checkpoint, hf_out):
    """Weight sharing makes every block the same map: iterating one from the embeddings gives every depth."""
    import lensdyn as ld
    from lensdyn.hooks.iterate import iterate

    register()
    model = ld.load_model(checkpoint)
    for block in (0, N_LAYERS - 1):
        states = iterate(model, hf_out.hidden_states[0][0], block=block, steps=N_LAYERS)
        torch.testing.assert_close(states, torch.stack(hf_out.hidden_states)[:, 0], atol=1e-5, rtol=0)


def test_deeper_than_trained(checkpoint, hf_out):
    deep = _boot(checkpoint, hf_config_overrides={"num_hidden_layers": 8})
    assert deep.cfg.n_layers == len(deep.blocks) == 8
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        _, cache = deep.run_with_cache(tokens)
        reference = _hf(checkpoint, num_hidden_layers=8)(tokens, output_hidden_states=True)
    for step in range(8):
        torch.testing.assert_close(cache[f"blocks.{step}.hook_resid_pre"], reference.hidden_states[step], atol=1e-5, rtol=0)
    for step in range(N_LAYERS + 1):  # the trained depth is a prefix of the deeper run
        torch.testing.assert_close(reference.hidden_states[step], hf_out.hidden_states[step], atol=1e-6, rtol=0)


def test_several_groups_and_inner_layers(tmp_path):
    config = transformers.AlbertConfig(**{**CONFIG, "num_hidden_layers": 4, "num_hidden_groups": 2, "inner_group_num": 2})
    path = tiny_checkpoint(tmp_path / "grouped", config, transformers.AlbertForMaskedLM)
    model = _boot(path)
    assert model.cfg.n_layers == len(model.blocks) == 8  # one block per AlbertLayer call
    tokens = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        out = _hf(path)(tokens, output_hidden_states=True)
    assert len(out.hidden_states) == 9
    for step in range(8):
        torch.testing.assert_close(cache[f"blocks.{step}.hook_resid_pre"], out.hidden_states[step], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache["blocks.7.hook_resid_post"], out.hidden_states[-1], atol=1e-6, rtol=0)
    q = [block.attn.q.weight for block in model.blocks]
    # Steps 0-1 run group 0 (layers a, b), steps 2-3 group 1 (c, d): a b a b c d c d.
    assert q[0] is q[2] and q[1] is q[3] and q[4] is q[6] and q[5] is q[7]
    assert len({id(w) for w in q}) == 4


def test_albert_model_without_head(tmp_path):
    path = tiny_checkpoint(tmp_path / "base", transformers.AlbertConfig(**CONFIG), transformers.AlbertModel)
    model = _boot(path)
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        output, cache = model.run_with_cache(tokens)
        out = transformers.AlbertModel.from_pretrained(path, attn_implementation="eager").eval()(
            tokens, output_hidden_states=True
        )
    assert model.cfg.n_layers == N_LAYERS
    torch.testing.assert_close(output, out.last_hidden_state, atol=1e-6, rtol=0)
    for step in range(N_LAYERS):
        torch.testing.assert_close(cache[f"blocks.{step}.hook_resid_pre"], out.hidden_states[step], atol=1e-6, rtol=0)


def test_random_weights_with_dropout_run_in_eval_mode(tmp_path):
    """``weights="random"`` builds from the config in training mode; every unrolled view must still be in eval."""
    import lensdyn as ld

    config = transformers.AlbertConfig(**CONFIG, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    path = tiny_checkpoint(tmp_path / "dropout", config, transformers.AlbertForMaskedLM)
    register()
    model = ld.load_model(path, weights="random", seed=3)
    assert not [name for name, module in model.named_modules() if module.training]
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        first, second = model(tokens), model(tokens)
    assert torch.equal(first, second)
    assert model.blocks[0].attn.q.weight is model.blocks[N_LAYERS - 1].attn.q.weight
    trained = _hf(path).albert.encoder.albert_layer_groups[0].albert_layers[0].attention.query.weight
    assert not torch.equal(model.blocks[0].attn.q.weight, trained)


def test_register_is_idempotent_and_unroll_too(checkpoint):
    from transformer_lens.factories import architecture_adapter_factory as factory

    register()
    register()
    for name in albert.ARCHITECTURES:
        assert factory.SUPPORTED_ARCHITECTURES[name] is albert.AlbertArchitectureAdapter
        assert factory.ArchitectureAdapterFactory._adapters[name] is albert.AlbertArchitectureAdapter
    hf = _hf(checkpoint)
    assert albert.unroll(hf) == N_LAYERS
    views = list(hf.albert.encoder.layers)
    assert albert.unroll(hf) == N_LAYERS
    assert list(hf.albert.encoder.layers) == views


def test_hugging_face_output_capture_survives_unrolling(checkpoint, tokens, hf_out):
    """Hugging Face's own ``hidden_states``/``attentions`` recording still sees every step, installed before or after."""
    before = _hf(checkpoint)
    with torch.no_grad():
        before(tokens, output_hidden_states=True)  # installs the capture hooks on the shared layer
        albert.unroll(before)
        after = _hf(checkpoint)
        albert.unroll(after)
        for model in (before, after):
            out = model(tokens, output_hidden_states=True, output_attentions=True)
            assert len(out.hidden_states) == N_LAYERS + 1 and len(out.attentions) == N_LAYERS
            for mine, theirs in zip(out.hidden_states + out.attentions, hf_out.hidden_states + hf_out.attentions):
                torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)
            torch.testing.assert_close(out.logits, hf_out.logits, atol=1e-6, rtol=0)


def test_weight_processing_is_refused(checkpoint):
    model = _boot(checkpoint)
    with pytest.raises(RuntimeError, match="compatibility mode"):
        model.enable_compatibility_mode()
    with pytest.raises(NotImplementedError, match="shares one layer"):
        model.process_weights()
