"""The measurement conventions every lensdyn number follows: cite ``lensdyn.conventions`` (and its number).

Each is stated here once; modules point here instead of restating or linking outside the package.
Where lensdyn does not yet do what a convention asks, it says so ("planned").

Vocabulary. A **state** is an entry of the residual trajectory, ``0..L`` (``L = n_layers``): ``L + 1``
of them. A **block** is a transformer block, ``0..L-1``: block ``l`` maps state ``l`` to state
``l + 1``, and the sublayer streams (``attn_out``, ``mlp_out``, ...) have one entry per block. Shape
strings say which: ``Float[Tensor, "state batch pos d_model"]`` for ``resid``, ``"block ..."`` for
a sublayer stream; a helper that takes either names the leading axis ``depth``. "Layer" is left to
the names of other libraries (``n_layers``, Hugging Face's decoder ``layers``) and to public
parameters (``layer=``, ``--layers``), which take block indices.

1. **State index** (implemented). State ``l`` for ``l < L`` is the input of block ``l``
   (``blocks.l.hook_resid_pre``); state ``L`` is the output of the last block *before* the final
   norm. The post-final-norm output is never a state: Hugging Face's last ``hidden_states`` entry
   is post-norm, and a "final contraction" read off it measures the norm, not a block.
   ``lensdyn.hooks.capture`` captures this way; every result records it
   (``Conventions.layer_convention``).
2. **Raw weights** (implemented). ``load_model`` returns the checkpoint's weights as they are: no
   ``fold_ln``, no centering, no compatibility mode (which centres the residual stream and changes
   every norm); ``weights="random"`` re-initialises the same architecture as the untrained control.
   Recorded in every result (``Conventions.weights``, ``Provenance.weights``).
3. **Positions** (implemented). Position 0 (BOS, attention sinks) carries norms up to 100,000x the
   rest, so aggregates leave it out by default (``exclude=("first",)``; the rules ``"first"``,
   ``"bos"``, ``"special"`` and 9's ``"massive"`` are configurable) and record what was left out
   (``Conventions.excluded_positions``). Norms report position 0 on its own line.
4. **Aggregation is named** (implemented). Ratio of means vs mean of ratios
   (``lensdyn.ops.AGGREGATIONS``), fits in log vs linear space (``lensdyn.fits``), all tokens vs the
   last token: each result states its choice in ``Conventions.aggregation``; nothing is implicit.
5. **Controls and nulls** (implemented). By default every command-line run measures the
   untrained twin (``--control random``, ``lensdyn.models.random_control``) beside the model, once
   per control seed (``--control-seeds``, default 0 1 2: one untrained sample is one sample of
   "untrained"; the verdict table shows each); analyses carry their own nulls (expansion: token
   permutation for the comoving reduction; stability: random-subspace null for K-theta;
   curvature: random walk and shuffled steps). The nulls and the bootstrap take their own seed
   (``--seed``), separate from the controls', and both are recorded (``report.json``: ``seeds``).
6. **float64** (implemented). Gram matrices, cosine distances, covariances and every accumulator
   over tokens or prompts are float64 (``lensdyn.ops``, ``lensdyn.sphere``, ``lensdyn.streaming``).
   A single token's norm accumulates in the activations' dtype, at least float32, and is returned
   as float64 (``lensdyn.ops.token_norms`` says why that is exact enough).
7. **Padding-aware batches** (implemented). Masks travel with every tensor: a ``Capture`` holds
   ``token_mask`` (real tokens) and ``mask`` (tokens that enter aggregates) and stores only real
   tokens (packed); every masked helper takes the mask explicitly.
8. **Two causal metrics** (implemented). Park, Choe and Veitch define the causal inner product on
   unembedding vectors, ``g^T Cov(gamma)^-1 g'`` (gamma: unembedding rows, centred by their mean,
   ``Cov`` normalised by ``1/V``); its dual on embedding-side vectors (residual states, steering
   vectors) is ``l^T Cov(gamma) l``. ``lensdyn.metric`` offers both by name, with one ridge:
   ``causal_inverse`` (``(Cov(gamma) + r I)^-1`` applied to residual states, the metric the FLRW
   expansion write-up used) and ``causal_dual`` (``Cov(gamma) + r I``, Park-consistent for residual
   states). Every result that uses one names it (``Conventions.causal_metrics``): expansion measures
   both (tracks ``causal`` and ``causal_dual``) and judges the write-up's causal claims under each;
   steering's ``a_causal`` and the corpus's causal scale factor use ``causal_inverse``. Applying
   either to raw residual states, before the final norm, is a choice, not a derivation.
9. **Massive activations** (implemented). Activations of magnitude > 100 and ~1000x the median (Sun et
   al. 2024) sit on the first token and on early delimiter tokens, not only position 0. The rule is
   ``lensdyn.ops.massive_mask``: ``|x_{l,t,i}| > 100`` and ``>= 1000 x median_j |x_{l,t,j}|`` (both
   hard bounds). ``lensdyn.analyses.massive`` reports which tokens, dimensions and states carry
   them, with the largest magnitude and its ratio where none passes. The exclusion rule
   ``"massive"`` (beside 3's) leaves out every position that holds one at any state, found during
   the capture; the positions are recorded in ``Capture.massive_positions`` and every result's
   ``Provenance.massive_positions`` (with ``massive_source``, the model they were found in), the
   rule in ``Conventions.excluded_positions``. The untrained control leaves out the trained
   model's positions, not its own, so the two are compared token for token.
10. **Verdicts carry uncertainty** (implemented). Claims are judged by rules written in code
    (``lensdyn.verdicts``), all the claims of one report as one family: a p-value claim holds only
    with its Holm-corrected p below 0.05 and its effect at or above a stated floor (no "holds" on a
    negligible effect); a null with too few draws to reach the corrected threshold makes it "not
    testable at N draws"; an undefined statistic is "not testable here", never a failure. Each
    verdict carries the share of bootstrap resamples of the prompts (``lensdyn.resampling``: tokens
    travel with their prompt) in which its rule holds, and is labelled robust (at least 95% agree),
    fragile, or not testable (fewer than 5 prompts, or no per-prompt data).
"""

# The layer convention as every result records it (convention 1); its words are part of the JSON files.
LAYER_CONVENTION = (
    "state l (l < n_layers) is the input of block l (hook_resid_pre); state n_layers is the "
    "last block's output before the final norm; the post-final-norm state is not a layer"
)
