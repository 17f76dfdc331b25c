"""Shared fixtures. Tests never touch the network: the hub is off before transformers loads."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from lensdyn.app.cli import thread_count  # noqa: E402

# OMP_NUM_THREADS, else the CPUs we were given; under pytest-xdist (`make test` runs two workers) shared
# out among the workers, and handed to the processes tests start (notebook kernels, CLI runs): two
# workers of two threads each on two cores would only contend.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, thread_count() // _WORKERS))
torch.set_num_threads(thread_count())


def tiny_bridge(**overrides):
    """A randomly initialised TL-native model: no tokenizer, no hub, milliseconds to build."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    config = dict(
        d_model=32, d_head=8, n_heads=4, n_layers=3, n_ctx=32, d_vocab=50, d_mlp=64,
        act_fn="gelu", normalization_type="LN", seed=0,
    )
    config.update(overrides)
    torch.manual_seed(config["seed"])
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**config))
    return model.eval()


def synthetic_capture(token_mask, exclude=("first",), layout="pre-norm", **streams):
    """A ``Capture`` built from given tensors (``resid=``, ``attn_out=``, ...): known inputs, known answers."""
    from lensdyn.hooks.capture import Capture
    from lensdyn.models import ModelInfo
    from lensdyn.prompts import PromptSet

    mask = token_mask.clone()
    if "first" in exclude:
        mask[:, 0] = False
    n_prompts, n_pos = token_mask.shape
    n_layers = streams["resid"].shape[0] - 1 if "resid" in streams else next(iter(streams.values())).shape[0]
    return Capture.from_padded(
        tokens=torch.zeros(token_mask.shape, dtype=torch.long),
        token_mask=token_mask,
        mask=mask,
        str_tokens=tuple(tuple("x" for _ in range(n_pos)) for _ in range(n_prompts)),
        prompts=PromptSet.from_texts(["p"] * n_prompts, name="synthetic"),
        model_info=ModelInfo("synthetic", "pretrained", 0, "float32", "none", layout, n_params=1000),
        exclude=tuple(exclude),
        truncated=(),
        n_layers=n_layers,
        **streams,
    )


@pytest.fixture
def tiny_model():
    return tiny_bridge()


@pytest.fixture
def tiny_gqa_model():
    """Llama-like: RMSNorm, rotary, gated MLP, 4 query heads sharing 2 KV heads."""
    return tiny_bridge(
        normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
        act_fn="silu", n_key_value_heads=2,
    )


@pytest.fixture(scope="session")
def smollm2():
    import lensdyn as ld

    return ld.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    import lensdyn as ld

    return ld.load_model("minilm-l6")


@pytest.fixture(scope="session")
def smollm2_diverse(smollm2):
    """Every stream of the built-in diverse set: shared by the smollm2 integration tests."""
    import lensdyn as ld

    return ld.capture(smollm2, "diverse")


@pytest.fixture(scope="session")
def smollm2_reference():
    """An independent Hugging Face model on the same cached float32 weights, for cross-checks."""
    from transformers import AutoModelForCausalLM

    from lensdyn.models import embedded_checkpoint

    return AutoModelForCausalLM.from_pretrained(embedded_checkpoint("smollm2-135m"), attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def minilm_reference():
    from transformers import AutoModelForMaskedLM

    from lensdyn.models import embedded_checkpoint

    return AutoModelForMaskedLM.from_pretrained(embedded_checkpoint("minilm-l6"), attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def minilm_report(tmp_path_factory):
    """``lensdyn report`` with every default analysis on minilm-l6 and two short prompts (run once per session)."""
    import json

    from lensdyn.app.cli import main

    root = tmp_path_factory.mktemp("minilm_report")
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"text": "The river rose to the fourth step of the old mill before dawn."}) + "\n"
        + json.dumps({"text": "Snow fell on the quiet village all night long, and nobody went out."}) + "\n"
    )
    out = root / "report"
    code = main(["report", "--model", "minilm-l6", "--prompts", str(prompts), "--exclude", "special",
                 "--permutations", "10", "--out", str(out)])
    assert code == 0
    return out


def word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer of ``vocab_size`` ids (``w0``, ``w1``, ...): lets a checkpoint load offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def tiny_checkpoint(directory, config, model_class, seed: int = 0):
    """Save a randomly initialised Hugging Face ``model_class(config)`` and a word tokenizer to ``directory``."""
    torch.manual_seed(seed)
    model_class(config).save_pretrained(directory)
    word_tokenizer(config.vocab_size).save_pretrained(directory)
    return str(directory)


@pytest.fixture
def tiny_llama(tmp_path):
    """A Hugging Face Llama checkpoint (3 layers, d_model 64, GQA) loaded through ``ld.load_model``: the
    prefix-cache fast paths and the self-test's Hugging Face layers are all there."""
    import lensdyn as ld
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return ld.load_model(tiny_checkpoint(tmp_path, config, LlamaForCausalLM))


def pytest_sessionstart(session):
    """Under pytest-xdist, build the embedded models' dequantised caches once, before the workers start
    (this hook runs ahead of xdist's own): otherwise each worker dequantises the same GGUF (~20 s)."""
    if session.config.getoption("numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        from lensdyn import models

        for name, spec in models.EMBEDDED_MODELS.items():
            if spec.package_dir() is not None:
                models.embedded_checkpoint(name)
