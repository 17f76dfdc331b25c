"""Block layouts: what each sublayer reads and what it writes into the residual stream.

Every transformer block lensdyn measures is one of four layouts. A capture's streams mean the
same thing on all of them (``attn_out`` is always attention's write into the residual, ``attn_in``
always what attention reads), but where each stream is read from, and which exist, differ:

=====================  =================================================  =====================================
layout                 block                                              families
=====================  =================================================  =====================================
``pre-norm``           ``mid = pre + attn(LN1(pre))``;                    Llama, Qwen, Mistral, GPT-2, OPT,
                       ``post = mid + mlp(LN2(mid))``                     BLOOM, StableLM
``post-sublayer-norm`` ``mid = pre + N1(attn(.))``; ``post = mid +        Gemma 2/3 (norms before *and* after
                       N2(mlp(.))``: a norm on each sublayer's output     each sublayer), OLMo 2 (after only:
                       before it is added                                 attention reads ``pre`` itself)
``parallel``           ``post = pre + attn(LN1(pre)) + mlp(LN2(pre))``:   GPT-NeoX / Pythia, Phi, GPT-J, Falcon
                       both sublayers read the block input; no mid state  (GPT-J, Phi, Falcon: one norm, LN1)
``post-norm``          ``mid = LN1(pre + attn(pre))``;                    BERT, ALBERT (one shared block)
                       ``post = LN2(mid + mlp(mid))``
=====================  =================================================  =====================================

Streams per layout (``resid`` is always the states between blocks, convention 1):

- ``attn_out`` / ``mlp_out``: what the sublayer adds to the residual (after its post-sublayer
  norm where there is one; before the norm on post-norm blocks).
- ``attn_in`` / ``mlp_in``: what the sublayer reads: the pre-norm's output; the residual itself
  where no norm precedes the sublayer (OLMo 2, post-norm blocks); on parallel blocks both read the
  block input (through LN1 alone where the block has one norm).
- ``resid_mid``: the state between the two sublayers; **absent on parallel blocks**.
- ``ln{1,2}_scale`` / ``ln{1,2}_normalized``: the pre-norms' divisor and unscaled output; absent
  where the block has no such norm (OLMo 2; ``ln2`` on one-norm parallel blocks).

Where a stream does not exist, every analysis says what it uses instead (``mlp_writes_into``):

- **gains**, ``reference="resid"``: the MLP's update relative to the residual it is added to:
  ``resid_mid`` on sequential blocks, the block input ``resid_pre`` on parallel ones. With
  ``reference="ln_output"`` (the FFN write-up's definition), the MLP's gain on Pythia is
  ``||mlp_out|| / ||LN2(resid_pre)||``: GPT-NeoX's ``post_attention_layernorm`` reads the block
  input, not a post-attention state, so the write-up's "MLP gain" is the same ratio on a parallel
  block as on a sequential one, with a different input.
- **expansion**'s attention/MLP share of ``||h_{l+1}||^2 - ||h_l||^2``: attention's terms
  ``2 h.a + ||a||^2`` and the MLP's ``2 b.m + ||m||^2`` with ``b`` the state the MLP writes into;
  on parallel blocks ``b = h`` and the interaction ``2 a.m`` belongs to neither.
- **patching** at ``attn_out`` / ``mlp_out`` replaces the sublayer's write on every layout; the
  **Jacobian**'s block map is ``resid_pre -> resid_post`` of the whole block on every layout, with
  ``norms="frozen"`` freezing every norm the block has (pre, post-sublayer, or post).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LayoutName = Literal["pre-norm", "post-sublayer-norm", "parallel", "post-norm"]
LAYOUT_NAMES: tuple[str, ...] = ("pre-norm", "post-sublayer-norm", "parallel", "post-norm")

# Hugging Face model types whose blocks normalise *after* the residual addition.
POST_NORM_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "albert", "distilbert", "electra"})


@dataclass(frozen=True)
class BlockLayout:
    """One model's block layout and the norms its blocks have (read off the bridge's hook points)."""

    name: LayoutName
    pre_norms: tuple[str, ...]  # "ln1", "ln2": norms that feed a sublayer
    post_sublayer_norms: tuple[str, ...] = ()  # "ln1_post", "ln2_post": norms on a sublayer's output

    @property
    def sequential(self) -> bool:
        """True where the MLP reads the state after attention's write (a ``resid_mid`` exists)."""
        return self.name != "parallel"

    @property
    def norms(self) -> tuple[str, ...]:
        """Every norm inside a block, as bridge submodule names."""
        return (*self.pre_norms, *self.post_sublayer_norms)

    def stream_hooks(self, block: int) -> dict[str, str]:
        """Stream name -> hook point of ``block`` that holds it (post-norm ``attn_out`` is derived in the capture).

        >>> sorted(BlockLayout("parallel", ("ln1",)).stream_hooks(0))[:4]
        ['attn_in', 'attn_out', 'ln1_normalized', 'ln1_scale']
        """
        b = f"blocks.{block}"
        if self.name == "post-norm":
            hooks = {"attn_in": f"{b}.hook_resid_pre", "attn_out": f"{b}.ln1.hook_in",
                     "resid_mid": f"{b}.ln1.hook_out", "mlp_in": f"{b}.ln1.hook_out"}
        else:
            first = f"{b}.ln1.hook_out" if "ln1" in self.pre_norms else f"{b}.hook_resid_pre"
            hooks = {"attn_in": first, "attn_out": f"{b}.hook_attn_out"}
            if self.sequential:
                hooks["resid_mid"] = f"{b}.hook_resid_mid"
                hooks["mlp_in"] = f"{b}.ln2.hook_out" if "ln2" in self.pre_norms else f"{b}.hook_resid_mid"
            else:
                hooks["mlp_in"] = f"{b}.ln2.hook_out" if "ln2" in self.pre_norms else first
        for ln in ("ln1", "ln2"):
            if ln in self.pre_norms:
                hooks[f"{ln}_scale"] = f"{b}.{ln}.hook_scale"
                hooks[f"{ln}_normalized"] = f"{b}.{ln}.hook_normalized"
        hooks["attention"] = f"{b}.attn.hook_pattern"
        hooks["mlp_out"] = f"{b}.hook_mlp_out"
        return hooks

    def describe(self) -> str:
        """One line for summaries and ``lensdyn models --check``."""
        norms = ", ".join(self.norms) or "none"
        return f"{self.name} (norms in each block: {norms})"


def detect_layout(hook_names, model_type: str | None) -> BlockLayout:
    """The layout of a bridge from its hook point names (``model.hook_dict``) and HF ``model_type``.

    >>> detect_layout({"blocks.0.ln1.hook_out", "blocks.0.ln2.hook_out", "blocks.0.hook_resid_mid"}, "llama").name
    'pre-norm'
    >>> detect_layout({"blocks.0.ln1.hook_out", "blocks.0.ln2.hook_out"}, "gpt_neox").name
    'parallel'
    """
    names = set(hook_names)
    present = tuple(ln for ln in ("ln1", "ln2") if f"blocks.0.{ln}.hook_out" in names)
    post = tuple(ln for ln in ("ln1_post", "ln2_post") if f"blocks.0.{ln}.hook_out" in names)
    if model_type in POST_NORM_MODEL_TYPES:
        return BlockLayout("post-norm", present)
    if "blocks.0.hook_resid_mid" not in names:
        return BlockLayout("parallel", present)
    if post:
        return BlockLayout("post-sublayer-norm", present, post)
    return BlockLayout("pre-norm", present)
