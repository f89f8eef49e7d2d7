"""Batched sampling from the policy, behind a small backend interface (a vLLM backend can plug in on GPU).

A rollout is `[left-padded prompt | right-padded response]`: prompts are left-padded so every response starts
at the same column, which makes the response slice `[:, P:]` and `logits_to_keep` trivial. A response counts
up to and including its first EOS; everything after it is padding and carries no loss.

`decode` is the sampling loop for `transformers` models: one prefill of each distinct prompt into a KV cache,
then one token per step for the rows still going. A row leaves the batch (and the cache) as soon as it samples
EOS, so the steps after most responses have ended run on the few that have not: on the GRPO benchmark (128 rows,
mean response 8 tokens, the longest 32) that is 55 ms of forwards per rollout instead of 91 ms for a loop that,
like `model.generate`, keeps every row to the end. Its KV cache reserves room for the whole rollout at the
prefill and writes each step's keys and values in place (`_ReservedLayer`), where `transformers`' `DynamicLayer`
copies the whole cache into a new tensor at every step. On our attention function (`keeps_prompts_apart`) the
prompts' cache stays one per prompt and each row's holds only its own tokens (`rlhf.models.shared_prefix`): a
group of k rows reads its prompt's keys and values once a step, not k times (1.5x new tokens/s for 16 prompts
of 100 tokens x 8 rows at hidden 256 and 512, 2x in bf16), where that saves enough reads to pay for its extra
ops (`SHARED_PREFIX_MIN_REREAD`); elsewhere each row gets a copy of its prompt's cache.
Models it does not know (remote code, other cache layouts) use `model.generate`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers import DynamicCache, GenerationConfig, GenerationMixin, LogitsProcessorList, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    LogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlhf.models import padding_free
from rlhf.models.forward import mixes_by_attention_alone, position_ids_from_mask, prompt_groups
from rlhf.models.precision import generation_autocast
from rlhf.models.shared_prefix import CHECK_KWARG, PREFIX_KWARG, CacheCheck, SharedPrefix
from rlhf.models.unwrap import base_model
from rlhf.progress import progress


@dataclass
class SamplingConfig:
    """What a backend samples with; `RolloutConfig.sampling` builds it from the checked config (`rollout.*`)."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0  # 1.0: off
    top_k: int = 0  # 0: off
    greedy: bool = False  # the most likely token at every step (evaluation), the others ignored


@dataclass
class Rollout:
    """One batch of generated responses. Shapes: B prompts, P prompt columns, T response columns."""

    prompt_ids: Tensor  # (B, P) left-padded
    prompt_mask: Tensor  # (B, P)
    response_ids: Tensor  # (B, T) right-padded with pad_id after the first EOS
    response_mask: Tensor  # (B, T) float, 1.0 up to and including the first EOS
    ended_with_eos: Tensor  # (B,) bool

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # (B, P+T)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1)  # (B, P+T)

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(-1).long()  # (B,)


class GenerationBackend(Protocol):
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig, keys: Tensor) -> Tensor:
        """Return the sampled response tokens (B, T'), T' <= max_new_tokens, padded after EOS, on the backend's
        device (the prompts may be elsewhere); row r sampled with the noise of keys[r] (`KeyedDraw`)."""
        ...


_MASK32 = 0xFFFFFFFF


def _mix32(x: Any) -> Any:
    """A 32-bit integer hash (Wellons' lowbias32) of a Python int or an int64 tensor holding values in [0, 2^32);
    the products wrap in int64 and only their low 32 bits are kept, so it is exact on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def key_hash(keys: Tensor) -> Tensor:
    """(b,) int64 in [0, 2^32): each int64 sampling key hashed, both of its halves mixed."""
    keys = keys.long()
    return _mix32(_mix32((keys >> 32) & _MASK32) ^ (keys & _MASK32))


def keyed_uniform(hashed: Tensor, step: int) -> Tensor:
    """(b,) float64 uniforms in (0, 1) with 32 random bits, a pure function of (key, step): the draw of row r at
    step t depends on nothing but its key and t (not on the batch it shares, the process or the device).
    `hashed`: `key_hash(keys)`."""
    bits = _mix32(hashed ^ _mix32((step + 0x9E3779B9) & _MASK32))
    return (bits.double() + 0.5) * 2.0**-32


def stream_keys(seed: int, counter: int, rows: Tensor) -> Tensor:
    """Sampling keys of `rows` (int64 row numbers) in stream (seed, counter), e.g. an online run's seed and
    iteration: a splitmix64 hash of the pair, plus the row number (mod 2^62)."""
    z = (seed * 0x9E3779B97F4A7C15 + counter + 1) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    base = (z ^ (z >> 31)) % 2**62
    return (rows.long() + base).remainder(2**62)


def random_keys(n: int) -> Tensor:
    """n sampling keys from one draw of torch's global RNG (callers without keys of their own: evaluation)."""
    base = int(torch.randint(0, 2**62, ()))
    return (base + torch.arange(n)).remainder(2**62)


class KeyedDraw(LogitsProcessor):
    """Sampling as an argmax: draws token i with probability softmax(scores)_i by the inverse CDF, with one
    uniform u per row, and returns the scores with +inf at the drawn token:

        c_j = sum_{i <= j} p_i  (p in float32, summed in float64),   token = min{ j : c_j > u * c_V }

    so `generate` in greedy mode draws from the same distribution as `do_sample=True`; tokens at -inf
    (p_i = 0) are never drawn. u is `keyed_uniform` of the row's key at the step: row r's draw is a function of
    its key and the step alone, so a completion does not depend on which rows share its batch or process. The
    online trainers key a row by (seed, iteration, its position in the global batch), which makes a rollout the
    same on 1 or N processes and a resumed run sample what an uninterrupted one does. `decode` passes the
    indices of the rows still going as the ids (`rows_as_ids`); `model.generate` keeps every row, so there rows
    are 0..B-1.

    One keyed uniform per row and step, rather than one per token (the Gumbel-max race): hashing a uniform for
    each of 64 x 263 scores took 0.22 ms a step, 44 ms at a 32,000-token vocabulary (1 thread), against 0.06 and
    7 ms for torch.rand's; this draw takes 0.08 and 4.3 ms (the softmax and the float64 cumulative sum).
    """

    def __init__(self, keys: Tensor, *, rows_as_ids: bool) -> None:
        self.hashed, self.rows_as_ids, self.step = key_hash(keys), rows_as_ids, 0

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.hashed = self.hashed.to(scores.device)  # once: a no-op from the second step on
        hashed = self.hashed[input_ids[:, 0]] if self.rows_as_ids else self.hashed
        u = keyed_uniform(hashed, self.step)[:, None]  # (b, 1)
        self.step += 1
        cdf = torch.softmax(scores.float(), dim=-1).double().cumsum_(-1)  # (b, V); 0 steps at -inf
        token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=scores.shape[-1] - 1)  # (b, 1)
        return scores.scatter_(1, token, float("inf"))  # the drawn token is the argmax, whatever the others


def sampler(sampling: SamplingConfig, keys: Tensor, *, rows_as_ids: bool = True) -> LogitsProcessorList:
    """What `generate(do_sample=True, temperature, top_k, top_p)` applies to the logits and draws, as logits
    processors for greedy mode: `transformers`' own warpers, then `KeyedDraw` over the rows' `keys` (none for
    `greedy`). One list per generate call: the draw counts the steps."""
    if sampling.greedy:
        return LogitsProcessorList()
    warpers: list[LogitsProcessor] = []
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return LogitsProcessorList([*warpers, KeyedDraw(keys, rows_as_ids=rows_as_ids)])


def decodes_itself(model: nn.Module) -> bool:
    """Whether `decode` can drive the model: a `transformers` causal LM (peft-wrapped or not) whose forward
    takes a `cache` and `logits_to_keep`, that mixes tokens by attention alone (`mixes_by_attention_alone`: its
    cache holds keys and values only) and decodes with a `DynamicCache` and `generate`'s standard inputs. Others
    are left to `generate`: state-space models (Mamba, RecurrentGemma) read the attention mask their own way, and
    `decode` drew other tokens than `generate` on tiny ones after two steps; Phi-3 recomputes its cache where its
    rotary scaling switches (its own `prepare_inputs_for_generation`)."""
    base = base_model(model)
    cls = type(base)
    if not cls.__module__.startswith("transformers.") or getattr(base.config, "is_encoder_decoder", False):
        return False
    if cls.prepare_inputs_for_generation is not GenerationMixin.prepare_inputs_for_generation:
        return False
    if not mixes_by_attention_alone(base):
        return False
    if not getattr(cls, "_supports_default_dynamic_cache", lambda: True)():  # a cache of its own (MiniMax)
        return False
    params = inspect.signature(base.forward).parameters
    return "cache" in params and "logits_to_keep" in params


class _ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in (B, H, capacity, d) buffers reserved at the first update: each
    update writes its positions in place and the attention reads a view of the filled part. `DynamicLayer`
    concatenates, copying the whole cache at every step, which makes a rollout's cache traffic quadratic in its
    length: sampling 256 new tokens for 64 rows from a 256 x 4 model ran at 4781 new tokens/s with it and 7433
    with this, 4136 and 5721 with rows ending at EOS (`benchmarks/bench_generation.py`, 2 threads, AMD EPYC Zen 5;
    the same tokens). Only what `decode` calls is supported: updates and `reorder_cache` (rows leaving)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.is_initialized = key_states.device, True
        self.key_buffer, self.value_buffer = (
            x.new_empty(*x.shape[:2], self.capacity, x.shape[3]) for x in (key_states, value_states)
        )

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # more than reserved: grow (the caller reserved too little)
            self.capacity = max(end, 2 * self.capacity)
            self.key_buffer, self.value_buffer = (self._grown(x) for x in (self.key_buffer, self.value_buffer))
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        return self._filled()

    def _filled(self) -> tuple[Tensor, Tensor]:
        """`keys` and `values` as `DynamicLayer` has them: views of the buffers' filled positions."""
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]
        return self.keys, self.values

    def _grown(self, buffer: Tensor) -> Tensor:
        grown = buffer.new_empty(*buffer.shape[:2], self.capacity, buffer.shape[3])
        grown[:, :, : self.length] = buffer[:, :, : self.length]
        return grown

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: Tensor) -> None:
        if not self.is_initialized:  # nothing written yet (rows left before their first token was cached)
            return
        self.key_buffer, self.value_buffer = (self._selected(x, beam_idx) for x in (self.key_buffer, self.value_buffer))
        self._filled()

    def _selected(self, buffer: Tensor, rows: Tensor) -> Tensor:
        """The buffer's first len(rows) rows holding these rows' filled positions (rows leave at many steps of a
        rollout, so the room after them is not copied); a new buffer where there are more rows than before (a
        prompt's cache handed to every row that samples from it, `decode`)."""
        kept = buffer[:, :, : self.length].index_select(0, rows)
        buffer = buffer[: len(rows)] if len(rows) <= buffer.shape[0] else buffer.new_empty(len(rows), *buffer.shape[1:])
        buffer[:, :, : self.length] = kept
        return buffer


def reserved_cache(model: nn.Module, capacity: int) -> DynamicCache:
    """The model's `DynamicCache` with every plain `DynamicLayer` reserving `capacity` positions (`_ReservedLayer`);
    other layer kinds (sliding windows) stay as `transformers` makes them."""
    cache = DynamicCache(config=getattr(model, "config", None))
    if cache.layer_class_to_replicate is DynamicLayer:  # no config: layers are made as the forward reaches them
        cache.layer_class_to_replicate = functools.partial(_ReservedLayer, capacity)
    cache.layers = [_ReservedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


SHARED_PREFIX_MIN_REREAD = 1 << 20
"""Prompt keys and values (elements of one layer's cache) that copies of the prompts' cache would have each decoding
step read again for the rows beyond each prompt's first, from which `decode` keeps the prompts' cache once
(`SharedPrefix`); below it the split attention's extra ops cost more than the reads they save. Its new tokens/s
against the copies' on a 2-core AMD EPYC (64 rows of 2-8 per prompt, prompts of 16-100 tokens, 32 new tokens,
hidden 64-512), by these elements: fp32 0.87-0.98x below 0.8M (one 1.07x), 1.03x at 0.92M, 1.05-1.47x from 1.2M;
bf16, noisier, 0.73-0.93x below 0.8M (two of 1.08x and 1.14x), 0.92-1.25x from 1.2M."""


def keeps_prompts_apart(model: nn.Module) -> bool:
    """Whether `decode` may keep the prompts' KV cache apart from the rows' own (`models.shared_prefix`): models on
    our attention function (`padding_free.enabled`) whose cache layers are all plain (no sliding windows). It does
    where its prefill also finds each attention layer reading its cache layer as it is (`CacheCheck`) and copies
    would read enough again (`SHARED_PREFIX_MIN_REREAD`)."""
    return padding_free.enabled(model) and all(
        type(layer) is _ReservedLayer for layer in reserved_cache(model, 1).layers
    )


@torch.no_grad()
def decode(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    logits_processor: LogitsProcessorList | None = None,
) -> Tensor:
    """Response tokens (B, T'), T' <= max_new_tokens, of left-padded prompts; `pad_token_id` after each row's
    first EOS (any of `eos_token_id`'s, as `stop_tokens` gives them).

    Each step takes the next token as the argmax of the last logits after `logits_processor` (with `sampler`'s
    processors: a draw from the sampling distribution; with none: greedy decoding). Rows that sampled EOS are
    dropped from the batch and the cache; positions continue each prompt's own (`cumsum` of the mask), as in
    the scoring passes. Each distinct prompt is prefilled once; where rows share prompts, the prompts' cache then
    serves them (`SharedPrefix`: where `keeps_prompts_apart`, the prefill's `CacheCheck` passed and copies would
    re-read at least `SHARED_PREFIX_MIN_REREAD` of a layer's cache each step; else a copy for each row).
    """
    B, P = prompt_ids.shape
    processors = logits_processor or LogitsProcessorList()
    cache = reserved_cache(model, P + max_new_tokens)
    positions = position_ids_from_mask(prompt_mask)
    copies, first = prompt_groups(prompt_ids, prompt_mask)  # the prefill runs each distinct prompt once
    check = CacheCheck(cache) if len(first) < B and keeps_prompts_apart(model) else None
    out = model(
        input_ids=prompt_ids[first],
        attention_mask=prompt_mask[first],
        position_ids=positions[first],
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
        **({CHECK_KWARG: check} if check is not None else {}),
    )
    if len(first) < B:  # its last logits go to each of its rows
        out.logits = out.logits[copies]
    prefix = _kept_once(cache, check, prompt_mask[first], copies) if check is not None else None
    if prefix is not None:  # the rows' own tokens go to a cache of their own
        cache = reserved_cache(model, max_new_tokens)
    elif len(first) < B:
        cache.reorder_cache(copies)  # a copy of its prompt's for each row
    stops = torch.tensor(eos_token_id, device=prompt_ids.device).flatten()
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    alive = torch.arange(B, device=prompt_ids.device)  # rows still generating, as indices into the batch
    mask, position = prompt_mask, positions[:, -1]
    width = 0
    for t in range(max_new_tokens):
        scores = out.logits[:, -1].float()  # (b, V)
        for process in processors:  # not the list's own call, which inspects each one's signature at every step
            scores = process(alive[:, None], scores)  # the warpers never read the ids
        step = scores.argmax(-1)  # (b,)
        tokens[alive, t], width = step, t + 1
        going = (~torch.isin(step, stops)).nonzero().squeeze(1)
        if t == max_new_tokens - 1 or going.numel() == 0:
            break
        if going.numel() < alive.numel():
            alive, step, mask, position = alive[going], step[going], mask[going], position[going]
            cache.reorder_cache(going)
            prefix = prefix.rows(going) if prefix is not None else None
        position = position + 1
        if prefix is None:  # the cache holds the prompts too: the mask covers their padding
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            context: dict[str, Any] = {"attention_mask": mask}
        else:  # the cache holds the rows' own tokens alone, none of them padding
            context = {PREFIX_KWARG: prefix}
        out = model(input_ids=step[:, None], position_ids=position[:, None], cache=cache, use_cache=True, **context)
    return tokens[:, :width]


def _kept_once(cache: DynamicCache, check: CacheCheck, mask: Tensor, copies: Tensor) -> SharedPrefix | None:
    """The prompts' cache (`mask` (G, P) their positions) kept once for the rows continuing them (`copies` (B,): each
    row's prompt), where the prefill's `check` passed and copies for the rows would re-read at least
    `SHARED_PREFIX_MIN_REREAD` of a layer's cache each step; else None."""
    if not check.passed:
        return None
    keys, values = zip(*((layer.keys, layer.values) for layer in cache.layers), strict=True)
    if (len(copies) - len(mask)) * (keys[0][0].numel() + values[0][0].numel()) < SHARED_PREFIX_MIN_REREAD:
        return None
    return SharedPrefix.of(list(keys), list(values), mask, copies)


class HFGenerationBackend:
    """`transformers` models sampling with a KV cache (`decode`, else `model.generate`); the model is the
    (unwrapped) policy itself.

    Sampling follows `SamplingConfig` alone (`sampler`; `generate_as_configured` for `model.generate`), so the
    log-probs the losses use are those of the sampler.
    """

    def __init__(self, model: nn.Module, *, eos_token_id: int | Sequence[int], pad_token_id: int) -> None:
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig, keys: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        was_training = self.model.training
        self.model.eval()
        eos = self.eos_token_id if isinstance(self.eos_token_id, int) else list(self.eos_token_id)
        ids = {"eos_token_id": eos, "pad_token_id": self.pad_token_id}
        try:
            with generation_autocast(self.model, prompt_ids.device):  # weights cast once, not at every token
                if decodes_itself(self.model):
                    n = sampling.max_new_tokens
                    processors = sampler(sampling, keys, rows_as_ids=True)
                    return decode(
                        self.model, prompt_ids, prompt_mask, max_new_tokens=n, logits_processor=processors, **ids
                    )
                # the draw is `sampler`'s last processor, so generate runs in greedy mode
                config = GenerationConfig(
                    do_sample=False, max_new_tokens=sampling.max_new_tokens, use_cache=True, **ids
                )  # a sequence of EOS ids: generate stops at any
                out = generate_as_configured(
                    self.model, prompt_ids, prompt_mask, config, sampler(sampling, keys, rows_as_ids=False)
                )
                return out[:, prompt_ids.shape[1] :]
        finally:
            self.model.train(was_training)


def generate_as_configured(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    config: GenerationConfig,
    logits_processor: LogitsProcessorList | None = None,
) -> Tensor:
    """`model.generate` with `config` (and `logits_processor`) and nothing else.

    `transformers` fills every field a passed config leaves unset from the model's own `generation_config` (the
    checkpoint's generation_config.json), so that one is swapped for a blank during the call: a repetition
    penalty, a minimum length or banned words shipped with a checkpoint would otherwise change the decoding.
    """
    shipped, model.generation_config = model.generation_config, GenerationConfig()
    try:
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=logits_processor,
        )
    finally:
        model.generation_config = shipped


def stop_tokens(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> tuple[int, ...]:
    """The tokens that end a response: the tokenizer's EOS, then any other that the model's generation config
    names. An instruct model's turn can end elsewhere than at its tokenizer's EOS (Gemma's `<end_of_turn>`,
    Phi-3's `<|end|>`): `generate` and vLLM stop there, and so do our rollouts."""
    ids = [tokenizer.eos_token_id]
    shipped = getattr(getattr(base_model(model), "generation_config", None), "eos_token_id", None)
    for token in [shipped] if isinstance(shipped, int) else shipped or []:
        if token not in ids:
            ids.append(token)
    return tuple(ids)


def token_ids(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> dict[str, Any]:
    """`eos_token_id` (`stop_tokens`) and `pad_token_id`: the keyword arguments `HFGenerationBackend` and
    `generate_rollout` take."""
    return {"eos_token_id": stop_tokens(tokenizer, model), "pad_token_id": tokenizer.pad_token_id}


def mask_after_eos(
    response_ids: Tensor, eos_token_id: int | Sequence[int], pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(ids with pad after the first EOS, float mask up to and including the first EOS, ended_with_eos (B,)); an
    EOS is any of `eos_token_id`'s."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_id, device=response_ids.device))  # (B, T)
    # Tokens strictly after the first EOS: at least one EOS among the earlier columns.
    eos_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = ~eos_before
    ids = torch.where(mask, response_ids, torch.full_like(response_ids, pad_token_id))
    return ids, mask.float(), is_eos.any(-1)


@torch.no_grad()
def generate_rollout(
    backend: GenerationBackend,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    sampling: SamplingConfig,
    *,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    chunk_size: int | None = None,
    keys: Tensor | None = None,
    progress_desc: str | None = None,
) -> Rollout:
    """Sample one response per prompt row, in chunks of `chunk_size` rows (one `generate` call each; None: all at
    once), responses padded to the widest chunk, everything after each response's first EOS masked.

    `keys` (B,) int64: each row's sampling key (`KeyedDraw`); None: fresh ones from torch's global RNG.
    `progress_desc`: a transient progress bar of that name over the chunks (None: none). The prompts may stay on
    the host while the backend samples on its device, a chunk at a time; the rollout is where the prompts are.

    Chunks take the rows longest prompt first (rows of one prompt stay together), each without the left padding
    all its rows share, so a chunk of short prompts is not prefilled, nor attends, at the longest prompt's width.
    A row's draw depends on its key alone, so the order changes no sample beyond float rounding; the rollout is
    returned in row order.

    A chunk narrower than the widest one finished every row with EOS (a row without EOS runs to max_new_tokens),
    so the pad columns added here always lie after an EOS and are masked.
    """
    B, P = prompt_ids.shape
    size = chunk_size or B
    keys = random_keys(B) if keys is None else keys
    lengths = prompt_mask.sum(-1).cpu()  # the order is chosen on the host, the rows taken where they are
    order = torch.argsort(lengths, descending=True, stable=True)
    chunks = []
    for s in progress(range(0, B, size), progress_desc or "", show=progress_desc is not None):
        rows = order[s : s + size]
        start = P - max(int(lengths[rows].max()), 1)  # the columns left of it pad every row of the chunk
        on = rows.to(prompt_ids.device)
        ids, mask = prompt_ids[on, start:], prompt_mask[on, start:]
        chunks.append(backend.generate(ids, mask, sampling, keys[rows.to(keys.device)]))
    width = max(c.shape[1] for c in chunks)
    raw = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad_token_id) for c in chunks])
    raw = raw[torch.argsort(order).to(raw.device)].to(prompt_ids.device)  # back in row order, beside the prompts
    ids, mask, ended = mask_after_eos(raw, eos_token_id, pad_token_id)
    return Rollout(prompt_ids, prompt_mask, ids, mask, ended)
