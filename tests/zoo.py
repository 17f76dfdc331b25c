"""A zoo of tiny random Hugging Face checkpoints (3 layers, d_model 64), one per architecture family.

Built offline from transformers config classes, saved with a word-level tokenizer
(``conftest.tiny_checkpoint``) and loaded with ``ld.load_model(path)``, as a user's checkpoint
would be. Used by ``tests/test_zoo.py`` and ``scripts/support_matrix.py``.
"""
from __future__ import annotations

import transformers as T

HIDDEN, LAYERS, VOCAB = 64, 3, 120
_DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                num_attention_heads=4, max_position_embeddings=64)
_GQA = dict(_DECODER, num_key_value_heads=2)

# The block layout each family must be detected as (lensdyn.layouts).
LAYOUTS = {"llama": "pre-norm", "qwen2": "pre-norm", "qwen3": "pre-norm", "mistral": "pre-norm", "stablelm": "pre-norm",
           "gpt2": "pre-norm", "opt": "pre-norm", "bloom": "pre-norm", "gemma2": "post-sublayer-norm",
           "gemma3": "post-sublayer-norm", "olmo2": "post-sublayer-norm", "gpt_neox": "parallel", "phi": "parallel",
           "gptj": "parallel", "falcon": "parallel", "bert": "post-norm", "albert": "post-norm"}


def families() -> dict[str, tuple[object, type]]:
    """Family name -> (config, model class): every layout lensdyn supports."""
    return {
        "llama": (T.LlamaConfig(**_GQA), T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config(**_GQA), T.Qwen2ForCausalLM),
        "qwen3": (T.Qwen3Config(**_GQA, head_dim=16), T.Qwen3ForCausalLM),
        "mistral": (T.MistralConfig(**_GQA), T.MistralForCausalLM),
        "gemma2": (T.Gemma2Config(**_GQA, head_dim=16), T.Gemma2ForCausalLM),
        "gemma3": (T.Gemma3TextConfig(**_GQA, head_dim=16), T.Gemma3ForCausalLM),
        "stablelm": (T.StableLmConfig(**_GQA), T.StableLmForCausalLM),
        "olmo2": (T.Olmo2Config(**_GQA), T.Olmo2ForCausalLM),
        "gpt2": (T.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64), T.GPT2LMHeadModel),
        "opt": (T.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                            word_embed_proj_dim=HIDDEN, max_position_embeddings=64), T.OPTForCausalLM),
        "bloom": (T.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=4), T.BloomForCausalLM),
        "gpt_neox": (T.GPTNeoXConfig(**_DECODER), T.GPTNeoXForCausalLM),
        "phi": (T.PhiConfig(**_DECODER), T.PhiForCausalLM),
        "gptj": (T.GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64, rotary_dim=8),
                 T.GPTJForCausalLM),
        "falcon": (T.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4),
                   T.FalconForCausalLM),
        "bert": (T.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=64), T.BertForMaskedLM),
        "albert": (T.AlbertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  intermediate_size=128, embedding_size=32, max_position_embeddings=64), T.AlbertForMaskedLM),
    }


def decoder_layers(hf_model):
    """The Hugging Face model's list of blocks (the ModuleList as long as its layer count)."""
    import torch

    n = hf_model.config.num_hidden_layers
    for _, module in hf_model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise LookupError(f"{type(hf_model).__name__}: no ModuleList of {n} layers")
