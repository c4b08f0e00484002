"""GLIMMER: a T5.1.1 reader with late-interaction memory and a built-in reranker.

de Jong, Zemlyanskiy, FitzGerald, Ainslie, Sanghai, Sha, Cohen (2023), "GLIMMER: generalized
late-interaction memory reranker", arXiv 2306.10231. Sections 2-3 of the paper, in its notation:

    H_i  = [MemEnc(Q); MemEnc(P_i)]              memory of P_i is pre-computed offline
    H'_i = LiveEncA(H_i)                          first beta * alpha * L encoder layers of the live part
    s_i  = w . H'_i[first token]   (or mean pool) rerank score (+ gamma * retriever score r_i, an option)
    R    = top-m of {H'_i} by s_i                 the other k - m passages are dropped here
    G    = Dec[LiveEncB(R_1); ...; LiveEncB(R_m)] Fusion-in-Decoder over the selected passages

    loss = lm_loss + lambda * KL(p_LM || p_rank)  perplexity distillation, as ATLAS computes it

The blocks are Hugging Face's `T5Block`s, laid out and named exactly as in
`T5ForConditionalGeneration`, so a T5 checkpoint loads weight for weight; the model adds only the
scoring head (and, optionally, a separate question encoder).

Shapes:
    b   batch            k   retrieved passages       m   selected passages
    lq  question tokens  lp  passage tokens            l   tokens of a [question; passage] pair
    t   target tokens    d   d_model                   v   vocabulary
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.t5.modeling_t5 import T5Block, T5PreTrainedModel, T5Stack
from transformers.utils import ModelOutput
from transformers.utils import logging as hf_logging

from glimmer_ray.model.configuration import GlimmerConfig

# --------------------------------------------------------------------------------------------
# Encoder stages: a run of T5 blocks over one sequence, with block 0's relative position bias.
# --------------------------------------------------------------------------------------------


def run_encoder_blocks(
    blocks: list[nn.Module],
    position_bias_source: nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    config: GlimmerConfig,
) -> torch.Tensor:
    """Apply `blocks` to `hidden` [n, l, d] with padding `mask` [n, l].

    Only block 0 of a T5 encoder owns `relative_attention_bias`; every later block reuses the bias
    computed there. Each stage therefore recomputes that bias from `position_bias_source` (block 0's
    attention) for its own sequence length, as `T5Stack` does for the whole encoder.
    """
    if not blocks:
        return hidden
    length = hidden.shape[1]
    attention_mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)
    position_bias = position_bias_source.compute_bias(length, length, device=hidden.device)  # [1, heads, l, l]
    for block in blocks:
        hidden = block(hidden, attention_mask, position_bias)[0]
    return hidden


CPU_LIVE_CHUNK_TOKENS = 2048  # the live stages' chunk on a CPU (jobs/benchmark_inference.py, chunk_tokens)


def resolve_chunk_tokens(chunk_tokens: int | str | None, device: torch.device) -> int | None:
    """The live stages' chunk size for a call: an int (tokens per chunk), None (every pair in one call), or
    "auto": `CPU_LIVE_CHUNK_TOKENS` on a CPU, where chunks let the allocator reuse a layer's activations, and
    one call on an accelerator, where chunks only cut the kernels' parallelism."""
    if chunk_tokens == "auto":
        return CPU_LIVE_CHUNK_TOKENS if torch.device(device).type == "cpu" else None
    if chunk_tokens is None:
        return None
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, None or 'auto', got {chunk_tokens!r}")
    return chunk_tokens


def run_in_chunks(stage, hidden: torch.Tensor, mask: torch.Tensor, chunk_tokens: int | None) -> torch.Tensor:
    """Apply `stage(hidden, mask)` to groups of rows holding at most `chunk_tokens` tokens each (None: one call).

    The result equals one call over all rows (rows do not interact in the encoder). Chunks keep the
    activations of a layer small enough to be reused by the allocator; on CPU one call over 25
    pairs of 352 tokens ran about 1.5x slower than the same work in chunks of 5.
    """
    if chunk_tokens is None:
        return stage(hidden, mask)
    rows_per_chunk = max(1, chunk_tokens // max(1, hidden.shape[1]))
    if hidden.shape[0] <= rows_per_chunk:
        return stage(hidden, mask)
    return torch.cat(
        [
            stage(hidden[i : i + rows_per_chunk], mask[i : i + rows_per_chunk])
            for i in range(0, hidden.shape[0], rows_per_chunk)
        ]
    )


def pack_pairs(
    question_memory: torch.Tensor,
    question_mask: torch.Tensor,
    passage_memory: torch.Tensor,
    passage_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate question and passage memory into H_i = [MemEnc(Q); MemEnc(P_i)].

    Question padding would otherwise sit between question and passage and shift the passage's
    relative positions; valid tokens are packed to the front (a stable sort keeps their order), so
    a pair reads exactly like the tokenised `question + passage` string of FiD. The result is cut to
    the longest pair in the batch.

    question_memory [b, lq, d], question_mask [b, lq], passage_memory [b, k, lp, d],
    passage_mask [b, k, lp]  ->  pairs [b, k, l, d], pair_mask [b, k, l]
    """
    batch_size, num_passages, _, width = passage_memory.shape
    question_length = question_memory.shape[1]
    hidden = torch.cat(
        [question_memory[:, None].expand(batch_size, num_passages, question_length, width), passage_memory],
        dim=2,
    )  # [b, k, lq + lp, d]
    mask = torch.cat(
        [question_mask[:, None].expand(batch_size, num_passages, question_length), passage_mask], dim=2
    ).to(torch.long)  # [b, k, lq + lp]
    packed_already = bool((mask[..., 1:] <= mask[..., :-1]).all())
    if not packed_already:
        order = torch.sort(1 - mask, dim=-1, stable=True).indices  # valid tokens first, order kept
        mask = torch.gather(mask, 2, order)
        hidden = torch.gather(hidden, 2, order[..., None].expand(-1, -1, -1, width))
    length = int(mask.sum(-1).max())
    return hidden[:, :, :length], mask[:, :, :length]


class RerankHead(nn.Module):
    """Score(H'_i): a linear projection of the first token, or of the mean over valid tokens; with
    `retrieval_prior`, plus gamma times the retriever's score of the passage (gamma learned)."""

    def __init__(self, d_model: int, scoring: str, retrieval_prior: bool = False) -> None:
        super().__init__()
        self.scoring = scoring
        self.proj = nn.Linear(d_model, 1)
        # gamma: the retriever's cosine scores differ by ~0.1 between passages, teacher log-likelihoods by ~1
        self.prior_weight = (
            nn.Parameter(torch.full((1,), 10.0)) if retrieval_prior else None
        )  # [1]: ZeRO flattens no 0-d tensor

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor, retrieval_scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden [n, l, d], mask [n, l], retrieval_scores [n] (needed with the prior) -> scores [n]."""
        if self.scoring == "first_token":
            pooled = hidden[:, 0]  # [n, d]
        else:
            weights = mask.to(hidden.dtype)[..., None]  # [n, l, 1]
            pooled = (hidden * weights).sum(1) / weights.sum(1)  # [n, d]
        scores = self.proj(pooled).squeeze(-1)  # [n]
        if self.prior_weight is None:
            return scores
        if retrieval_scores is None:
            raise ValueError(
                "this reader scores passages with a retrieval prior (retrieval_prior=True): pass retrieval_scores, "
                "the retriever's score of every passage [b, k]"
            )
        return scores + self.prior_weight * retrieval_scores.to(scores.dtype)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


@dataclass
class GlimmerEncoding(ModelOutput):
    """The live encoder's output, ready for the decoder.

    hidden [b, m*l, d] and mask [b, m*l] hold the m selected pairs side by side (FiD fusion);
    rerank_scores [b, k] (None without reranking); selected [b, m] indices into the k passages,
    in descending score order. live_a [b*k, l, d] and live_a_mask [b*k, l]: live stage A's output for all k pairs,
    detached, kept only when asked (`keep_live_a`) for the distillation teacher to read on from.
    """

    hidden: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    rerank_scores: torch.Tensor | None = None
    selected: torch.Tensor | None = None
    live_a: torch.Tensor | None = None
    live_a_mask: torch.Tensor | None = None


@dataclass
class GlimmerOutput(ModelOutput):
    """`loss = lm_loss + pdist_weight * pdist_loss`; logits [b, t, v]; pdist_target [b, k], the teacher's
    length-normalised answer log-likelihoods the reranker's scores were distilled towards (None without
    distillation)."""

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    pdist_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    rerank_scores: torch.Tensor | None = None
    selected: torch.Tensor | None = None
    pdist_target: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def glimmer_config_from_t5(t5_config, options: dict) -> GlimmerConfig:
    """A GlimmerConfig holding a T5 config's shape and the GLIMMER `options`."""
    settings = t5_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        settings.pop(key, None)
    return GlimmerConfig(**{**settings, **options})


def _stack_reading(embeddings: nn.Embedding, config: GlimmerConfig) -> T5Stack:
    """A `T5Stack` whose token embedding is `embeddings` (the model's `shared`, as T5 ties them). T5Stack builds an
    embedding of its own, which the tie replaces at once; it is built one row long, so no vocabulary-sized copy is
    ever allocated (under ZeRO-3's `zero.Init` each would be partitioned and written on every rank, then dropped)."""
    vocab_size, config.vocab_size = config.vocab_size, 1
    try:
        stack = T5Stack(config)
    finally:
        config.vocab_size = vocab_size
    stack.set_input_embeddings(embeddings)
    return stack


class GlimmerForConditionalGeneration(T5PreTrainedModel):
    """GLIMMER reader: memory encoder, live encoder with built-in reranker, FiD decoder.

    Parameters are named as in `T5ForConditionalGeneration` (`shared`, `encoder.block.N`,
    `decoder.*`, `lm_head`) plus `rerank_head` and, with `separate_question_encoder`,
    `question_encoder.N`.
    """

    config_class = GlimmerConfig
    base_model_prefix = "glimmer"
    _keys_to_ignore_on_load_unexpected = [
        r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"
    ]

    def __init__(self, config: GlimmerConfig) -> None:
        if not isinstance(config, GlimmerConfig):
            raise TypeError(f"expected a GlimmerConfig, got {type(config).__name__}")
        # Embedding ties always hold; the output embedding is tied only for original T5 (not T5.1.1).
        self._tied_weights_keys = {
            "encoder.embed_tokens.weight": "shared.weight",
            "decoder.embed_tokens.weight": "shared.weight",
        }
        if config.lm_head_tied:
            self._tied_weights_keys["lm_head.weight"] = "shared.weight"
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)

        encoder_config = copy.deepcopy(config)
        encoder_config.is_decoder = False
        encoder_config.use_cache = False
        self.encoder = _stack_reading(self.shared, encoder_config)  # used block by block, never as T5Stack.forward
        decoder_config = copy.deepcopy(config)
        decoder_config.is_decoder = True
        decoder_config.num_layers = config.num_decoder_layers
        self.decoder = _stack_reading(self.shared, decoder_config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.rerank_head = RerankHead(config.d_model, config.scoring, config.retrieval_prior)
        if config.separate_question_encoder:
            self.question_encoder = nn.ModuleList(
                [
                    T5Block(encoder_config, has_relative_attention_bias=i == 0, layer_idx=i)
                    for i in range(config.num_memory_layers)
                ]
            )
        else:
            self.question_encoder = None
        self.post_init()

    # ---- Hugging Face plumbing -----------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.shared = new_embeddings
        self.encoder.set_input_embeddings(new_embeddings)
        self.decoder.set_input_embeddings(new_embeddings)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        factor = self.config.initializer_factor
        if isinstance(module, GlimmerForConditionalGeneration):
            nn.init.normal_(module.shared.weight, mean=0.0, std=factor)
            if not self.config.lm_head_tied:
                nn.init.normal_(module.lm_head.weight, mean=0.0, std=factor)
        elif isinstance(module, RerankHead):
            if module.prior_weight is None:
                nn.init.normal_(module.proj.weight, mean=0.0, std=factor * self.config.d_model**-0.5)
            else:  # the untrained scorer ranks exactly as the retriever
                nn.init.zeros_(module.proj.weight)
                module.prior_weight.fill_(10.0)
            nn.init.zeros_(module.proj.bias)

    @classmethod
    def from_t5(
        cls,
        path_or_model: str | os.PathLike | T5ForConditionalGeneration,
        **options,
    ) -> "GlimmerForConditionalGeneration":
        """Build GLIMMER from a Hugging Face T5 checkpoint directory or a loaded T5 model.

        `options` are `GlimmerConfig` arguments (live_proportion, rerank_proportion, num_selected,
        scoring, separate_question_encoder, retrieval_prior). Every T5 weight is copied unchanged; the scoring
        head is freshly initialised and a separate question encoder starts as a copy of the memory layers.

        A directory is read by Hugging Face's loader straight into GLIMMER (GLIMMER names its parameters as
        T5 does): the model is built on the meta device and filled shard by shard, in the checkpoint's dtype,
        so no whole T5 and no throw-away random GLIMMER are ever held beside it (and under a live ZeRO-3
        `HfDeepSpeedConfig` each rank materialises only its partition).
        """
        if isinstance(path_or_model, T5ForConditionalGeneration):
            return cls._from_loaded_t5(path_or_model, **options)
        path = os.fspath(path_or_model)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"T5 checkpoint directory not found: {path}")
        source_config = AutoConfig.from_pretrained(path)
        if source_config.model_type != "t5":
            raise ValueError(
                f"{path} holds a {source_config.model_type!r} checkpoint; GLIMMER is built from a T5 "
                "(T5.1.1) encoder-decoder checkpoint (model_type 't5')"
            )
        config = glimmer_config_from_t5(source_config, options)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the missing head and question encoder are expected; checked below
        try:
            model, info = cls.from_pretrained(
                path,
                config=config,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        missing = [n for n in info["missing_keys"] if not n.startswith(("rerank_head.", "question_encoder."))]
        unexpected = [n for n in info["unexpected_keys"] if "EncDecAttention.relative_attention_bias" not in n]
        if missing or unexpected or info["mismatched_keys"]:
            raise ValueError(
                f"T5 checkpoint {path} does not fit the GLIMMER layout: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}, mismatched {sorted(info['mismatched_keys'])}"
            )
        if config.separate_question_encoder:
            with torch.no_grad():
                for index, block in enumerate(model.question_encoder):
                    block.load_state_dict(model.encoder.block[index].state_dict())
        return model

    @classmethod
    def _from_loaded_t5(cls, t5: T5ForConditionalGeneration, **options) -> "GlimmerForConditionalGeneration":
        """GLIMMER holding a copy of an in-memory T5's weights (a random T5 built for training from scratch)."""
        config = glimmer_config_from_t5(t5.config, options)
        model = cls(config)
        state = t5.state_dict()
        if config.separate_question_encoder:
            for name, tensor in list(state.items()):
                if name.startswith("encoder.block."):
                    index = int(name.split(".")[2])
                    if index < config.num_memory_layers:
                        state["question_encoder." + name[len("encoder.block.") :]] = tensor
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [name for name in missing if not name.startswith("rerank_head.")]
        unexpected = [name for name in unexpected if "EncDecAttention.relative_attention_bias" not in name]
        if missing or unexpected:
            raise ValueError(
                f"T5 checkpoint does not fit the GLIMMER layout: missing {missing}, unexpected {unexpected}"
            )
        model.to(t5.dtype)
        return model

    # ---- Memory encoder ------------------------------------------------------------------

    @property
    def memory_blocks(self) -> list[nn.Module]:
        return list(self.encoder.block[: self.config.num_memory_layers])

    @property
    def live_a_blocks(self) -> list[nn.Module]:
        start = self.config.num_memory_layers
        return list(self.encoder.block[start : start + self.config.num_live_a_layers])

    @property
    def live_b_blocks(self) -> list[nn.Module]:
        return list(self.encoder.block[self.config.num_memory_layers + self.config.num_live_a_layers :])

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.dropout(self.shared(ids))

    def encode_memory(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """MemEnc: embeddings then the first n_mem encoder blocks, for passages or questions.

        Returns the un-normalised residual stream [n, l, d] (the final layer norm runs once, at
        the end of the live encoder). With alpha = 1 this is the dropout-applied embedding.
        """
        _check_ids(input_ids, attention_mask, "input_ids")
        return run_encoder_blocks(
            self.memory_blocks, self._position_bias_source, self._embed(input_ids), attention_mask, self.encoder.config
        )

    def encode_question(self, question_ids: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """MemEnc(Q), by the shared memory encoder or, if configured, a separate question encoder."""
        if self.question_encoder is None:
            return self.encode_memory(question_ids, question_mask)
        _check_ids(question_ids, question_mask, "question_ids")
        source = self.question_encoder[0].layer[0].SelfAttention if len(self.question_encoder) else None
        return run_encoder_blocks(
            list(self.question_encoder), source, self._embed(question_ids), question_mask, self.encoder.config
        )

    @property
    def _position_bias_source(self) -> nn.Module:
        return self.encoder.block[0].layer[0].SelfAttention

    # ---- Live encoder: stage A, scorer, top-m, stage B -------------------------------------

    def live_encode(
        self,
        question_memory: torch.Tensor,
        question_mask: torch.Tensor,
        passage_memory: torch.Tensor,
        passage_mask: torch.Tensor,
        num_selected: int | None = None,
        chunk_tokens: int | str | None = "auto",
        select_by: str = "reranker",
        retrieval_scores: torch.Tensor | None = None,
        keep_live_a: bool = False,
    ) -> GlimmerEncoding:
        """LiveEncA over all k pairs, score, keep the top m, LiveEncB over those m only.

        question_memory [b, lq, d], passage_memory [b, k, lp, d], retrieval_scores [b, k] (the
        retriever's, read by a scorer with `retrieval_prior`); `num_selected` overrides the
        config's m for this call. Without reranking all k pairs pass both stages in order.
        Pairs go through each stage in chunks of at most `chunk_tokens` tokens (same result; None: one
        call; "auto": chunks on a CPU only, `resolve_chunk_tokens`). `keep_live_a` returns stage A's output
        for all k pairs, detached (the distillation teacher's starting point). `select_by="retriever"` keeps the first m passages (the retriever's order) while still
        returning the rerank scores: a training warm-up for a reader that cannot read yet.
        """
        if select_by not in ("reranker", "retriever"):
            raise ValueError(f"select_by must be 'reranker' or 'retriever', got {select_by!r}")
        batch_size, num_passages = passage_memory.shape[:2]
        m = self._resolve_num_selected(num_selected, num_passages)
        pairs, pair_mask = pack_pairs(
            question_memory, question_mask, passage_memory.to(question_memory.dtype), passage_mask
        )  # [b, k, l, d], [b, k, l]
        length, width = pairs.shape[2:]
        hidden = pairs.reshape(batch_size * num_passages, length, width)  # [b*k, l, d]
        flat_mask = pair_mask.reshape(batch_size * num_passages, length)  # [b*k, l]
        chunk_tokens = resolve_chunk_tokens(chunk_tokens, hidden.device)
        hidden = run_in_chunks(self._live_a, hidden, flat_mask, chunk_tokens)
        live_a = hidden.detach() if keep_live_a else None

        if m is None:
            scores = None
            selected = torch.arange(num_passages, device=hidden.device).expand(batch_size, num_passages)
            kept, kept_mask = hidden, flat_mask
            m = num_passages
        else:
            prior = None if retrieval_scores is None else retrieval_scores.reshape(batch_size * num_passages)  # [b*k]
            scores = self.rerank_head(hidden, flat_mask, prior).view(batch_size, num_passages)  # [b, k]
            if select_by == "retriever":
                selected = torch.arange(m, device=hidden.device).expand(batch_size, m)  # [b, m]
            else:
                selected = torch.topk(scores, m, dim=1).indices  # [b, m]
            hidden = hidden.view(batch_size, num_passages, length, width)  # [b, k, l, d]
            kept = torch.gather(hidden, 1, selected[:, :, None, None].expand(-1, -1, length, width))  # [b, m, l, d]
            kept = kept.reshape(batch_size * m, length, width)  # [b*m, l, d]
            kept_mask = torch.gather(pair_mask, 1, selected[:, :, None].expand(-1, -1, length))  # [b, m, l]
            kept_mask = kept_mask.reshape(batch_size * m, length)  # [b*m, l]

        kept = run_in_chunks(self._live_b, kept, kept_mask, chunk_tokens)
        return GlimmerEncoding(
            hidden=kept.reshape(batch_size, m * length, width),  # [b, m*l, d]
            mask=kept_mask.reshape(batch_size, m * length),  # [b, m*l]
            rerank_scores=scores,
            selected=selected,
            live_a=live_a,
            live_a_mask=flat_mask if keep_live_a else None,
        )

    def _live_a(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return run_encoder_blocks(self.live_a_blocks, self._position_bias_source, hidden, mask, self.encoder.config)

    def _live_b(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """LiveEncB then T5's final layer norm and dropout (run once, after the last block)."""
        hidden = run_encoder_blocks(self.live_b_blocks, self._position_bias_source, hidden, mask, self.encoder.config)
        return self.encoder.dropout(self.encoder.final_layer_norm(hidden))

    def encode(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        passage_ids: torch.Tensor | None = None,
        passage_mask: torch.Tensor | None = None,
        passage_memory: torch.Tensor | None = None,
        num_selected: int | None = None,
        select_by: str = "reranker",
        retrieval_scores: torch.Tensor | None = None,
        chunk_tokens: int | str | None = "auto",
        keep_live_a: bool = False,
    ) -> GlimmerEncoding:
        """Memory (from tokens, or the pre-computed `passage_memory`) then the live encoder."""
        passage_memory = self._passage_memory(question_ids, question_mask, passage_ids, passage_mask, passage_memory)
        question_memory = self.encode_question(question_ids, question_mask)
        return self.live_encode(
            question_memory,
            question_mask,
            passage_memory,
            passage_mask,
            num_selected,
            chunk_tokens=chunk_tokens,
            select_by=select_by,
            retrieval_scores=retrieval_scores,
            keep_live_a=keep_live_a,
        )

    # ---- Decoder, loss, generation ---------------------------------------------------------

    def decode(
        self,
        encoding_hidden: torch.Tensor,
        encoding_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor,
    ) -> torch.Tensor:
        """FiD decoder over the fused pairs: returns logits [n, t, v]."""
        output = self.decoder(
            input_ids=decoder_input_ids,
            encoder_hidden_states=encoding_hidden,
            encoder_attention_mask=encoding_mask,
            use_cache=False,
        )[0]  # [n, t, d]
        if self.config.lm_head_tied:
            output = output * self.config.d_model**-0.5
        return self.lm_head(output)

    def forward(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        passage_ids: torch.Tensor | None = None,
        passage_mask: torch.Tensor | None = None,
        passage_memory: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        num_selected: int | None = None,
        pdist_weight: float = 1.0,
        pdist_temperature: float = 1.0,
        select_by: str = "reranker",
        retrieval_scores: torch.Tensor | None = None,
        chunk_tokens: int | str | None = "auto",
        teacher_reuse: bool = True,
    ) -> GlimmerOutput:
        """Score, select and read k passages per question.

        Args:
            question_ids, question_mask: [b, lq].
            passage_ids: [b, k, lp] token ids, or `passage_memory` [b, k, lp, d] pre-computed by
                `encode_memory` (exactly one of the two); passage_mask [b, k, lp].
            labels: [b, t] target ids, -100 where ignored. Gives `lm_loss` and, when reranking,
                the perplexity-distillation loss.
            decoder_input_ids: [b, t], default: labels shifted right.
            num_selected: m for this call (default: the config's).
            pdist_weight: lambda; pdist_temperature: tau (the paper: 1.0; tau = 0.1 scored best).
            select_by: "reranker" (the model) or "retriever" (the first m passages are read; the
                rerank scores are still returned and distilled), a training warm-up.
            retrieval_scores: [b, k] the retriever's scores, read by a scorer with `retrieval_prior`.
            chunk_tokens: the live stages' chunk (`resolve_chunk_tokens`; "auto": chunks on a CPU only).
            teacher_reuse: the distillation teacher reads on from this pass's live stage A states (detached)
                instead of running the memory encoder and stage A again; used only where the two are equal,
                i.e. no dropout is active (the teacher reads in eval mode, as ATLAS's). Without reuse the teacher
                runs first, before any module runs with gradients: DeepSpeed ZeRO-3 counts a module's pending
                backward passes at each forward and a later no-grad forward resets the count, which would keep
                every parameter gathered in backward until it ends (`_post_backward_module_hook`).
        """
        distilling = labels is not None and pdist_weight > 0
        dropout_active = self.training and self.config.dropout_rate > 0
        reuse = distilling and teacher_reuse and not dropout_active
        target = None
        reranking = (num_selected if num_selected is not None else self.config.num_selected) is not None
        teacher_inputs = (question_ids, question_mask, passage_ids, passage_mask, passage_memory, labels)
        if distilling and reranking and not reuse:
            target = self.passage_log_likelihood(*teacher_inputs, chunk_tokens=chunk_tokens)  # [b, k]
        encoding = self.encode(
            question_ids,
            question_mask,
            passage_ids,
            passage_mask,
            passage_memory,
            num_selected,
            select_by=select_by,
            retrieval_scores=retrieval_scores,
            chunk_tokens=chunk_tokens,
            keep_live_a=reuse,
        )
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs labels or decoder_input_ids; use generate() for inference")
            decoder_input_ids = self._shift_right(labels)
        logits = self.decode(encoding.hidden, encoding.mask, decoder_input_ids)  # [b, t, v]

        lm_loss = pdist_loss = loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            loss = lm_loss
            if encoding.rerank_scores is not None and pdist_weight > 0:
                if target is None:  # reading on from this pass's live stage A states
                    target = self.passage_log_likelihood(
                        *teacher_inputs,
                        live_a=encoding.live_a,
                        live_a_mask=encoding.live_a_mask,
                        chunk_tokens=chunk_tokens,
                    )  # [b, k]
                pdist_loss = perplexity_distillation_loss(encoding.rerank_scores, target, pdist_temperature)
                loss = lm_loss + pdist_weight * pdist_loss
        return GlimmerOutput(
            loss=loss,
            lm_loss=lm_loss,
            pdist_loss=pdist_loss,
            logits=logits,
            rerank_scores=encoding.rerank_scores,
            selected=encoding.selected,
            pdist_target=target,
        )

    @torch.no_grad()
    def passage_log_likelihood(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        passage_ids: torch.Tensor | None,
        passage_mask: torch.Tensor,
        passage_memory: torch.Tensor | None,
        labels: torch.Tensor,
        live_a: torch.Tensor | None = None,
        live_a_mask: torch.Tensor | None = None,
        chunk_tokens: int | str | None = "auto",
    ) -> torch.Tensor:
        """The perplexity-distillation target: log p(answer | Q, P_i) with each passage read alone.

        As ATLAS's `perplexity_score`: no gradient, dropout off, every passage through the whole
        reader by itself, the answer's log-likelihood averaged over its tokens. Returns [b, k].
        `live_a` [b*k, l, d] / `live_a_mask` [b*k, l]: live stage A's output for the k pairs, already
        computed by the student's pass with the same weights and no dropout; the teacher then runs only
        stage B and the decoder (the same numbers, without the memory encoder and stage A again).
        """
        was_training = self.training
        self.eval()
        try:
            batch_size, num_passages = passage_mask.shape[:2]
            if live_a is None:
                passage_memory = self._passage_memory(
                    question_ids, question_mask, passage_ids, passage_mask, passage_memory
                )
                question_memory = self.encode_question(question_ids, question_mask)
                pairs, pair_mask = pack_pairs(
                    question_memory, question_mask, passage_memory.to(question_memory.dtype), passage_mask
                )
                length, width = pairs.shape[2:]
                live_a = pairs.reshape(batch_size * num_passages, length, width)  # [b*k, l, d]
                live_a_mask = pair_mask.reshape(batch_size * num_passages, length)  # [b*k, l]
                live_a = run_in_chunks(
                    self._live_a, live_a, live_a_mask, resolve_chunk_tokens(chunk_tokens, live_a.device)
                )
            elif live_a_mask is None or live_a.shape[0] != batch_size * num_passages:
                raise ValueError(
                    f"live_a needs its mask and one row per pair: {batch_size} x {num_passages} pairs, got "
                    f"{tuple(live_a.shape)}"
                )
            hidden = run_in_chunks(self._live_b, live_a, live_a_mask, resolve_chunk_tokens(chunk_tokens, live_a.device))
            passage_labels = labels.repeat_interleave(num_passages, dim=0)  # [b*k, t]
            logits = self.decode(hidden, live_a_mask, self._shift_right(passage_labels))  # [b*k, t, v]
            valid = passage_labels != -100
            token_log_probs = torch.gather(
                F.log_softmax(logits.float(), dim=-1), 2, passage_labels.clamp(min=0)[..., None]
            ).squeeze(-1)  # [b*k, t]
            mean_log_prob = (token_log_probs * valid).sum(-1) / valid.sum(-1).clamp(min=1)  # [b*k]
            return mean_log_prob.view(batch_size, num_passages)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate_from_encoding(
        self,
        encoding_hidden: torch.Tensor,
        encoding_mask: torch.Tensor,
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
    ) -> torch.Tensor:
        """Greedy decoding with a key/value cache over a fused encoding [b, m*l, d].

        The cross-attention keys and values of the m*l encoder tokens are computed once, at the first
        step. Returns token ids [b, 1 + steps] starting with the decoder start token, padded after
        EOS, as `T5ForConditionalGeneration.generate` returns them; `min_new_tokens` forbids EOS
        before that many tokens (fixed-length answers for benchmarks).
        """
        if max_new_tokens < 1 or min_new_tokens < 0 or min_new_tokens > max_new_tokens:
            raise ValueError(
                f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens, got {max_new_tokens}, {min_new_tokens}"
            )
        batch_size = encoding_hidden.shape[0]
        eos, pad = self.config.eos_token_id, self.config.pad_token_id
        cache = EncoderDecoderCache(DynamicCache(config=self.decoder.config), DynamicCache(config=self.decoder.config))
        tokens = torch.full(
            (batch_size, 1), self.config.decoder_start_token_id, dtype=torch.long, device=encoding_hidden.device
        )
        finished = torch.zeros(batch_size, dtype=torch.bool, device=encoding_hidden.device)
        for step in range(max_new_tokens):
            output = self.decoder(
                input_ids=tokens[:, -1:],
                encoder_hidden_states=encoding_hidden,
                encoder_attention_mask=encoding_mask,
                past_key_values=cache,
                use_cache=True,
            )[0]  # [b, 1, d]
            if self.config.lm_head_tied:
                output = output * self.config.d_model**-0.5
            logits = self.lm_head(output[:, -1])  # [b, v]
            if step < min_new_tokens:
                logits[:, eos] = torch.finfo(logits.dtype).min
            next_tokens = torch.where(finished, torch.full_like(finished, pad, dtype=torch.long), logits.argmax(-1))
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)  # [b, step + 2]
            finished |= next_tokens == eos
            if bool(finished.all()):
                break
        return tokens

    @torch.no_grad()
    def generate(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        passage_ids: torch.Tensor | None = None,
        passage_mask: torch.Tensor | None = None,
        passage_memory: torch.Tensor | None = None,
        num_selected: int | None = None,
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        select_by: str = "reranker",
        retrieval_scores: torch.Tensor | None = None,
        chunk_tokens: int | str | None = "auto",
    ) -> tuple[torch.Tensor, GlimmerEncoding]:
        """Greedy answers for a batch: returns (token ids [b, t'], the encoding with scores and selection);
        `select_by="retriever"` reads the retriever's first m (a reader whose reranker is not trained yet);
        `retrieval_scores` [b, k] for a scorer with `retrieval_prior`; `chunk_tokens` as in `live_encode`."""
        encoding = self.encode(
            question_ids,
            question_mask,
            passage_ids,
            passage_mask,
            passage_memory,
            num_selected,
            select_by=select_by,
            retrieval_scores=retrieval_scores,
            chunk_tokens=chunk_tokens,
        )
        tokens = self.generate_from_encoding(encoding.hidden, encoding.mask, max_new_tokens, min_new_tokens)
        return tokens, encoding

    # ---- Input checks ----------------------------------------------------------------------

    def _resolve_num_selected(self, num_selected: int | None, num_passages: int) -> int | None:
        m = self.config.num_selected if num_selected is None else num_selected
        if m is None:
            return None
        if isinstance(m, bool) or int(m) != m or m < 1:
            raise ValueError(f"num_selected (m) must be a positive integer, got {m!r}")
        if m > num_passages:
            raise ValueError(f"num_selected (m = {m}) exceeds the number of passages given (k = {num_passages})")
        return int(m)

    def _passage_memory(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        passage_ids: torch.Tensor | None,
        passage_mask: torch.Tensor | None,
        passage_memory: torch.Tensor | None,
    ) -> torch.Tensor:
        """Validate the inputs and return passage memory [b, k, lp, d], computing it from tokens if needed."""
        if (passage_ids is None) == (passage_memory is None):
            raise ValueError("give exactly one of passage_ids [b, k, lp] or passage_memory [b, k, lp, d]")
        if passage_mask is None:
            raise ValueError("passage_mask [b, k, lp] is required")
        _check_ids(question_ids, question_mask, "question_ids")
        source = passage_ids if passage_ids is not None else passage_memory
        expected_dims = 3 if passage_ids is not None else 4
        name = "passage_ids" if passage_ids is not None else "passage_memory"
        if source.dim() != expected_dims:
            raise ValueError(f"{name} must have {expected_dims} dimensions, got shape {tuple(source.shape)}")
        batch_size, num_passages, passage_length = source.shape[:3]
        if passage_mask.shape != (batch_size, num_passages, passage_length):
            raise ValueError(
                f"passage_mask has shape {tuple(passage_mask.shape)}, expected {(batch_size, num_passages, passage_length)} to match {name}"
            )
        if batch_size != question_ids.shape[0]:
            raise ValueError(f"{name} has batch size {batch_size} but question_ids has {question_ids.shape[0]}")
        if num_passages == 0 or passage_length == 0:
            raise ValueError(
                f"{name} holds no passages (shape {tuple(source.shape)}); give at least one non-empty passage per question"
            )
        empty = (passage_mask.sum(-1) == 0).nonzero()
        if len(empty):
            example, passage = empty[0].tolist()
            raise ValueError(
                f"passage {passage} of example {example} is empty (its mask is all zeros); drop or pad it with real text"
            )
        if passage_memory is not None:
            if passage_memory.shape[-1] != self.config.d_model:
                raise ValueError(
                    f"passage_memory width {passage_memory.shape[-1]} does not match d_model {self.config.d_model}"
                )
            return passage_memory
        flat_ids = passage_ids.reshape(batch_size * num_passages, passage_length)  # [b*k, lp]
        flat_mask = passage_mask.reshape(batch_size * num_passages, passage_length)  # [b*k, lp]
        memory = self.encode_memory(flat_ids, flat_mask)  # [b*k, lp, d]
        return memory.view(batch_size, num_passages, passage_length, -1)  # [b, k, lp, d]


def _check_ids(ids: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    if ids.dim() != 2:
        raise ValueError(f"{name} must be [n, length], got shape {tuple(ids.shape)}")
    if mask is None or mask.shape != ids.shape:
        raise ValueError(
            f"the mask of {name} must have shape {tuple(ids.shape)}, got {None if mask is None else tuple(mask.shape)}"
        )
    if ids.shape[1] == 0 or bool((mask.sum(-1) == 0).any()):
        raise ValueError(f"{name} holds an empty sequence (no unmasked token)")


def perplexity_distillation_loss(scores: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL( softmax(target / tau) || softmax(scores / tau) ), summed over k, averaged over the batch.

    scores [b, k] are the reranker's; target [b, k] the length-normalised answer log-likelihoods.
    (ATLAS's `kldivloss` uses `KLDivLoss()` with mean reduction, i.e. this divided by k.)
    """
    if temperature <= 0:
        raise ValueError(f"pdist temperature must be positive, got {temperature}")
    target_probs = torch.softmax(target.detach().float() / temperature, dim=-1)
    log_probs = F.log_softmax(scores.float() / temperature, dim=-1)
    return F.kl_div(log_probs, target_probs, reduction="batchmean")
