"""ALBERT as a TransformerBridge: one shared layer, unrolled into one block per depth step.

ALBERT (``AlbertForMaskedLM``, ``AlbertModel``) has no adapter in TransformerLens 4.3. Its encoder
is one set of layer weights applied ``num_hidden_layers`` times, so the bridge's usual "a block
wraps a distinct Hugging Face layer" does not hold. This adapter makes depth literal:

* :func:`unroll` (run by the adapter's ``prepare_model``, before the bridge is built) gives the
  encoder ``layers``, an ``nn.ModuleList`` with one entry per depth step. Each entry is a *shared
  view* of the Hugging Face ``AlbertLayer`` that step runs: its own module objects (so the bridge
  can install step ``l``'s hook points in it without touching step ``l + 1``'s) holding the very
  same ``nn.Parameter`` objects. The encoder's class becomes :class:`UnrolledAlbertTransformer`,
  whose ``forward`` is Hugging Face's with its group-index loop replaced by a walk over
  ``layers``: the same modules in the same order, so the numbers are Hugging Face's, bit for bit.
* :class:`AlbertArchitectureAdapter` maps ``blocks`` to ``encoder.layers`` with the hook names
  TransformerLens' BERT adapter exposes (ALBERT's block is BERT's post-norm block):
  ``blocks.{l}.hook_resid_pre`` is ``hidden_states[l]``, ``ln1`` is the norm after the attention
  residual add (``attention.LayerNorm``), ``ln2`` the norm after the MLP add
  (``full_layer_layer_norm``), ``hook_mlp_out`` the MLP output before that add, and
  ``attn.hook_pattern`` step ``l``'s attention. ``project_in`` (as in TransformerLens' OPT
  adapter) is ``embedding_hidden_mapping_in``, from ``embedding_size`` to ``hidden_size``: the
  embeddings (``embed``, ``pos_embed``, ``embed_ln``) are ``embedding_size`` wide.

With ``num_hidden_groups > 1`` or ``inner_group_num > 1`` (the released Google checkpoints have neither) there
is one block per ``AlbertLayer`` call, as many as Hugging Face's ``hidden_states`` minus one, and
``cfg.n_layers`` counts them. Since the weights do not depend on the depth, a checkpoint can be
run deeper than it was trained: ``boot_transformers(path, hf_config_overrides={"num_hidden_layers": 48})``.

:func:`register` makes ``TransformerBridge.boot_transformers`` (and so ``lensdyn.load_model``)
accept ALBERT checkpoints. Weight processing (``enable_compatibility_mode``, ``process_weights``)
is refused: it writes a processed copy of the weights into each block, so the depth steps would
no longer share them (and fold_ln is wrong for post-norm blocks, as for BERT).
"""
from __future__ import annotations

import copy
from typing import Any

from torch import nn
from transformer_lens.conversion_utils.conversion_steps import RearrangeTensorConversion
from transformer_lens.conversion_utils.param_processing_conversion import ParamProcessingConversion
from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
from transformer_lens.model_bridge.generalized_components import (
    AttentionBridge,
    BlockBridge,
    EmbeddingBridge,
    LinearBridge,
    MLPBridge,
    NormalizationBridge,
    PosEmbedBridge,
    UnembeddingBridge,
)
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.albert.modeling_albert import AlbertTransformer

ARCHITECTURES = ("AlbertForMaskedLM", "AlbertModel")

_LN = {"use_native_layernorm_autograd": True}


def _shared_view(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree made of new module objects that hold the same parameters and buffers.

    Setting an attribute on the view (as the bridge does when it installs its wrappers) leaves the
    original untouched; the parameters stay the same tensors, so training or editing either edits both.
    """
    if "forward" in module.__dict__:
        # accelerate's dispatch (device_map, offload) binds a forward to the original module: a
        # view would run the original's submodules and bypass every hook point the bridge installs.
        raise NotImplementedError(
            f"ALBERT's shared {type(module).__name__} has an instance-level forward (accelerate dispatch, "
            "device_map?): load ALBERT on one device"
        )
    view = copy.copy(module)  # a new object whose __dict__ entries are module's own objects
    # Its own tables, same entries: parameters and buffers stay the same tensors; hooks already on
    # the original (e.g. Hugging Face's output capture) fire at every step, as they did on the
    # shared layer, while hooks added to one view later stay on that view.
    for name, value in module.__dict__.items():
        if name in ("_parameters", "_buffers", "_non_persistent_buffers_set") or (
            name.startswith("_") and "hooks" in name and isinstance(value, dict)
        ):
            view.__dict__[name] = copy.copy(value)
    view.__dict__["_modules"] = {
        name: None if child is None else _shared_view(child) for name, child in module._modules.items()
    }
    return view


class UnrolledAlbertTransformer(AlbertTransformer):
    """``AlbertTransformer`` whose depth loop walks ``self.layers``, one shared-weight view per step."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        hidden_states = self.embedding_hidden_mapping_in(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, **kwargs)
        return BaseModelOutput(last_hidden_state=hidden_states)


def _base(hf_model: nn.Module) -> nn.Module:
    """The ``AlbertModel`` inside ``hf_model`` (``hf_model.albert``, or the model itself)."""
    base = getattr(hf_model, "albert", hf_model)
    if not hasattr(base, "encoder") or not hasattr(base.encoder, "albert_layer_groups"):
        raise TypeError(f"{type(hf_model).__name__} is not an ALBERT model (no encoder.albert_layer_groups)")
    return base


def unroll(hf_model: nn.Module) -> int:
    """Give ``hf_model``'s encoder one shared-weight layer view per depth step; return the number of steps.

    In place and idempotent. Step ``i`` runs group ``int(i / (num_hidden_layers / num_hidden_groups))``,
    as in Hugging Face's ``AlbertTransformer.forward``, and each of that group's layers in turn.
    """
    encoder = _base(hf_model).encoder
    if isinstance(encoder, UnrolledAlbertTransformer):
        return len(encoder.layers)
    config = encoder.config
    n_steps, n_groups = config.num_hidden_layers, config.num_hidden_groups
    views = []
    for step in range(n_steps):
        group = encoder.albert_layer_groups[int(step / (n_steps / n_groups))]
        views.extend(_shared_view(layer) for layer in group.albert_layers)
    encoder.__class__ = UnrolledAlbertTransformer
    encoder.layers = nn.ModuleList(views)
    return len(views)


class AlbertArchitectureAdapter(ArchitectureAdapter):
    """ALBERT: BERT's post-norm block, one shared layer unrolled over depth (see the module docstring)."""

    supports_generation: bool = False
    # Weight processing writes a processed copy of each block's tensors back into that block, which
    # would silently give every depth step its own weights: refuse it (lensdyn never applies it).
    supports_compatibility_mode: bool = False

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.cfg.normalization_type = "LN"
        self.cfg.positional_embedding_type = "standard"
        self.cfg.final_rms = False
        self.cfg.gated_mlp = False
        self.cfg.attn_only = False
        self.cfg.attention_dir = "bidirectional"
        # Post-norm, like BERT: fold_ln would fold each norm into the wrong sublayer.
        self.supports_fold_ln = False

        n_heads = self.cfg.n_heads
        heads_in = RearrangeTensorConversion("(h d_head) d_model -> h d_model d_head", h=n_heads)
        heads_bias = RearrangeTensorConversion("(h d_head) -> h d_head", h=n_heads)
        self.weight_processing_conversions = {
            **{f"blocks.{{i}}.attn.{p}.weight": ParamProcessingConversion(tensor_conversion=heads_in) for p in "qkv"},
            **{f"blocks.{{i}}.attn.{p}.bias": ParamProcessingConversion(tensor_conversion=heads_bias) for p in "qkv"},
            "blocks.{i}.attn.o.weight": ParamProcessingConversion(
                tensor_conversion=RearrangeTensorConversion("d_model (h d_head) -> h d_head d_model", h=n_heads)
            ),
        }
        masked_lm = self.cfg.architecture != "AlbertModel"
        prefix = "albert." if masked_lm else ""
        self.component_mapping = {
            "embed": EmbeddingBridge(name=f"{prefix}embeddings.word_embeddings"),
            "token_type_embed": EmbeddingBridge(name=f"{prefix}embeddings.token_type_embeddings"),
            "pos_embed": PosEmbedBridge(name=f"{prefix}embeddings.position_embeddings"),
            "embed_ln": NormalizationBridge(name=f"{prefix}embeddings.LayerNorm", config=self.cfg, **_LN),
            "project_in": LinearBridge(name=f"{prefix}encoder.embedding_hidden_mapping_in"),
            "blocks": BlockBridge(
                name=f"{prefix}encoder.layers",
                # As for BERT: the MLP is two sibling linears, no module of its own.
                hook_alias_overrides={"hook_mlp_out": "mlp.out.hook_out", "hook_mlp_in": "mlp.in.hook_in"},
                submodules={
                    "ln1": NormalizationBridge(name="attention.LayerNorm", config=self.cfg, **_LN),
                    "ln2": NormalizationBridge(name="full_layer_layer_norm", config=self.cfg, **_LN),
                    "attn": AttentionBridge(
                        name="attention",
                        config=self.cfg,
                        submodules={
                            "q": LinearBridge(name="query"),
                            "k": LinearBridge(name="key"),
                            "v": LinearBridge(name="value"),
                            "o": LinearBridge(name="dense"),
                        },
                    ),
                    "mlp": MLPBridge(
                        name=None,
                        config=self.cfg,
                        submodules={"in": LinearBridge(name="ffn"), "out": LinearBridge(name="ffn_output")},
                    ),
                },
            ),
        }
        if masked_lm:
            self.component_mapping.update(
                {
                    "mlm_head": LinearBridge(name="predictions.dense"),
                    "ln_final": NormalizationBridge(name="predictions.LayerNorm", config=self.cfg, **_LN),
                    "unembed": UnembeddingBridge(name="predictions.decoder"),
                }
            )

    def prepare_model(self, hf_model: Any) -> None:
        super().prepare_model(hf_model)
        self.cfg.n_layers = unroll(hf_model)

    def preprocess_weights(self, state_dict: dict) -> dict:
        """Refuse ``process_weights``: see ``supports_compatibility_mode``."""
        raise NotImplementedError(
            "ALBERT shares one layer's weights across depth; TransformerLens' weight processing would give each "
            "block its own processed copy. Use the bridge's raw weights (lensdyn's default)."
        )


def register() -> None:
    """Make TransformerLens bridge ``AlbertForMaskedLM`` and ``AlbertModel`` checkpoints. Idempotent.

    ``ArchitectureAdapterFactory.register_adapter`` is TransformerLens' API for an outside adapter,
    but in 4.3 ``boot_transformers`` first names the architecture with
    ``determine_architecture_from_hf_config``, which accepts only the keys of the module-level
    ``SUPPORTED_ARCHITECTURES`` dict (not the factory's registry), so the names go there too; and
    ``AlbertModel`` must load with ``AutoModel``, not the ``AutoModelForCausalLM`` fallback.
    """
    from transformer_lens.factories import architecture_adapter_factory as factory
    from transformer_lens.utilities import architectures

    adapter = AlbertArchitectureAdapter
    for name in ARCHITECTURES:
        factory.ArchitectureAdapterFactory.register_adapter(name, adapter)
        factory.SUPPORTED_ARCHITECTURES[name] = adapter
    architectures.MASKED_LM_ARCHITECTURES.add("AlbertForMaskedLM")
    architectures.BASE_AUTOMODEL_ARCHITECTURES.add("AlbertModel")
