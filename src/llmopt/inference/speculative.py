"""Speculative decoding: a cheap proposer guesses k tokens, the target checks them all in one forward.

Leviathan, Kalman & Matias 2023 ("Fast Inference from Transformers via Speculative Decoding") and
Chen et al. 2023 ("Accelerating Large Language Model Decoding with Speculative Sampling"); the loop
follows gpt-fast's `speculative_decode`, with batch size above 1, an adaptive k and any proposer:

- `DraftModelProposer(draft)`: a small model with the target's vocabulary decodes k tokens.
- `FeatureDraftProposer(head)`: an EAGLE head (`llmopt.models.feature_draft.FeatureDraft`) that reads the
  target's own final hidden states (the loop hands them over after every target forward).
- `llmopt.inference.prompt_lookup.PromptLookupProposer`: n-gram matches in the text so far (no model).

Numerics contract: exact. Greedy (temperature 0): a draft token is kept only if it is the target's
argmax at that position, and the token after the last kept one is the target's argmax, so the output is
the target's own greedy output (up to the summation order of a k+1-token forward against a 1-token one,
about 1e-6 in the logits). Sampling: draft token d ~ q is kept with probability min(1, p(d)/q(d)); at the
first rejection a token is drawn from normalize(max(p - q, 0)); when all k are kept a bonus token is
drawn from p. Each emitted token is then distributed exactly as the target's p (with the same
temperature / top-k / top-p filtering applied to both p and q). A deterministic proposer (prompt lookup)
is the case q = one-hot(d).

Batch > 1: all rows share positions (left-padded prompts, see `cache.set_key_padding`), so a round keeps
the smallest number of accepted tokens over the unfinished rows, n, and every row emits n + 1 tokens: its
first n draft tokens and its own token at column n (the correction for the rows that rejected there, the
accepted draft token for the others). Cutting a row's accepted run short keeps the distribution exact:
each emitted token is, given the tokens before it, drawn from the target.

Caches roll back with `truncate`: positions are the source of truth, so rejected slots are overwritten.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from llmopt.inference.cache import KVCache, _max_len_error, make_cache
from llmopt.inference.cpu_linear import cpu_linear_kernels
from llmopt.inference.generate import (GenerateResult, _check_kernels, _make_generator, _prepare_prompts,
                                       _Stopper, _sync, last_logits, plain_forward, prefill)
from llmopt.inference.sampling import logits_to_probs, sample


# ---- proposals ----------------------------------------------------------------------------------
@dataclass
class Proposal:
    """What a proposer returns for one round."""

    tokens: torch.Tensor
    """(B, k) proposed tokens (k may be 0: nothing to propose, the round is a plain decode step)."""
    probs: torch.Tensor | None = None
    """(B, k, V) the distributions the tokens were drawn from; None for a deterministic proposer."""
    valid: torch.Tensor | None = None
    """(B, k) bool, False where a row has no proposal (rejected for sure); None means all valid."""


class DraftModelProposer:
    """A draft model with its own cache: catches up on the tokens it has not seen, then decodes k tokens."""

    def __init__(self, draft, *, compile: bool = False) -> None:
        self.draft = draft
        self.cache: KVCache | None = None
        self.compile = compile

    def start(self, target, batch_size: int, max_len: int, padding: torch.Tensor | None) -> None:
        if self.draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"draft vocabulary ({self.draft.config.vocab_size}) differs from the target's "
                             f"({target.config.vocab_size}); the draft must share the target's tokenizer")
        if self.cache is None or self.cache.batch_size != batch_size or self.cache.max_len < max_len:
            self.cache = make_cache(self.draft, batch_size, max_len)
        self.cache.reset()
        self.cache.set_key_padding(padding)

    def propose(self, seq: torch.Tensor, k: int, sampling: dict) -> Proposal:
        B, S = seq.shape
        cache, device = self.cache, seq.device
        start = cache.seq_len
        logits = last_logits(self.draft, seq[:, start:], torch.arange(start, S, device=device), cache)
        tokens, probs = [], []
        for j in range(k):
            if j > 0:
                logits = self.draft(tokens[-1][:, None], input_pos=torch.tensor([S - 1 + j], device=device),
                                    cache=cache)[:, -1]
            tokens.append(sample(logits, **sampling))
            if sampling["temperature"] > 0:
                probs.append(logits_to_probs(logits, sampling["temperature"], sampling["top_k"], sampling["top_p"]))
        return Proposal(torch.stack(tokens, 1), torch.stack(probs, 1) if probs else None)

    def rollback(self, length: int) -> None:
        self.cache.truncate(min(self.cache.seq_len, length))


class FeatureDraftProposer:
    """An EAGLE head (`FeatureDraft`) proposes: it reads the target's final hidden state at each position.

    The loop hands the proposer the target's hidden states (`observe`) after the prefill and after every
    verify forward (only the accepted positions). The head keeps its own one-block cache; a round first
    feeds it the positions whose true features arrived since the last round (h_p with the token at p + 1),
    then drafts k tokens on its own predicted features. Those k positions are dropped afterwards (the
    cache is truncated back to the last true-feature position): the next round re-feeds them with the
    target's features.
    """

    wants_hidden = True

    @property
    def sizes_itself(self) -> bool:
        """The loop asks for up to k_max tokens whenever its adaptive k would draft at all."""
        return self.stop_below is not None

    def __init__(self, draft, *, min_confidence: float | None = None, stop_below: float | None = None) -> None:
        for name, value in (("min_confidence", min_confidence), ("stop_below", stop_below)):
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1) or None, got {value}")
        self.draft = draft
        self.min_confidence = min_confidence
        """Stop drafting (EAGLE-2's use of the head's confidence, on a chain) once the head's probability of its
        top token falls below this in every row (the first token too: then the round is a plain decode step);
        when sampling, a row below it proposes nothing more (its later columns are invalid). None: always draft
        the k tokens asked for."""
        self.stop_below = stop_below
        """Size the chain by the head's confidence: keep drafting while the head's probability that the chain is
        right (the product of its probabilities of its tokens so far, times its top probability for the next)
        stays at or above this in some row, up to the loop's k_max (`sizes_itself`): long chains where the text
        is predictable (a repeated line), none where it is not. None: draft the k the loop's adaptive k asks
        for. When sampling, the bar reads the next distribution's top probability before the draw, so the
        drafted tokens stay draws from the head's distribution and the output the target's."""
        self.stopped_early = False  # the last proposal ended on the head's confidence before k
        self.cache: KVCache | None = None
        self.features: torch.Tensor | None = None
        self.known = 0  # positions < known have the target's features
        self.true_len = 0  # positions < true_len of the head's cache were fed true features

    def prepare(self, target) -> None:
        """Before the CPU kernels are bound: link the head to the target (its output rows are copied here)."""
        from llmopt.models.feature_draft import FeatureDraft

        if not isinstance(self.draft, FeatureDraft):
            raise ValueError(f"FeatureDraftProposer needs a FeatureDraft head, got {type(self.draft).__name__}; "
                             "use DraftModelProposer for a standalone draft model")
        if not plain_forward(target):
            raise ValueError("a feature draft reads the target's hidden states, which needs the plain model "
                             "contract (model(x) == lm_head(hidden_states(x)), no forward hooks); use a "
                             "standalone draft (DraftModelProposer) with this target")
        if not self.draft.attached_to(target):  # (a head attached to this target, maybe quantized since, is kept)
            self.draft.attach(target)  # checks that the head was trained for this target

    def start(self, target, batch_size: int, max_len: int, padding: torch.Tensor | None) -> None:
        if not self.draft.attached_to(target):
            self.prepare(target)
        max_len = min(max_len, self.draft.config.max_seq_len)
        if self.cache is None or self.cache.batch_size != batch_size or self.cache.max_len < max_len:
            self.cache = make_cache(self.draft, batch_size, max_len)
            self.features = torch.zeros(batch_size, max_len, self.draft.config.dim, device=self.cache.device,
                                        dtype=self.draft.dtype)
        self.cache.reset()
        self.cache.set_key_padding(padding)
        self.known = self.true_len = 0

    def observe(self, hidden: torch.Tensor, start: int) -> None:
        """The target's final hidden states (B, T, dim) at positions start..start+T-1."""
        T = hidden.size(1)
        self.features[:, start:start + T] = hidden
        self.known = start + T

    def propose(self, seq: torch.Tensor, k: int, sampling: dict) -> Proposal:
        B, S = seq.shape
        draft, cache, device = self.draft, self.cache, seq.device
        if self.known < S - 1:
            raise RuntimeError(f"the feature draft has the target's states for {self.known} positions, needs "
                               f"{S - 1}: call observe after every target forward")
        start = cache.seq_len
        f = draft.forward_cached(self.features[:, start:S - 1], seq[:, start + 1:S],
                                 prev_tokens=draft.context_tokens(seq, start, S - 1),  # the tokens at p, p - 1, ...
                                 input_pos=torch.arange(start, S - 1, device=device),
                                 cache=cache)[:, -1]  # predicts the target's state at S - 1, hence the token at S
        self.true_len = S - 1
        greedy = sampling["temperature"] == 0
        gated = self.min_confidence is not None or self.stop_below is not None
        tokens, probs, valid = [], [], []
        chain = torch.ones(B, device=device)  # the head's probability that every token so far is right, per row
        alive = torch.ones(B, dtype=torch.bool, device=device)  # rows still above the bars
        self.stopped_early = False
        for j in range(k):
            if j > 0:  # position S - 2 + j: its token is seq[:, -1] (j = 1) or the draft's token j - 2
                at = (draft.context_tokens(torch.cat([seq, torch.stack(tokens, 1)], dim=1), S - 2 + j, S - 1 + j)
                      if draft.n_prev else None)  # the tokens at S - 2 + j, S - 3 + j, ... drafts included
                f = draft.forward_cached(f[:, None], tokens[-1][:, None], prev_tokens=at,
                                         input_pos=torch.tensor([S - 2 + j], device=device), cache=cache)[:, -1]
            if greedy:
                small = draft.logits(f)
                top, index = small.float().softmax(-1).max(-1) if gated else (None, small.argmax(-1))
                token = draft.vocab_ids[index]
            else:
                logits = draft.full_logits(f)
                q = logits_to_probs(logits, sampling["temperature"], sampling["top_k"], sampling["top_p"])
                # the bars read the distribution's own top probability, never the drawn token's: a stop that
                # depended on the draw would skew the drafted tokens away from q and the output from the target's
                top = q.max(-1).values.float() if gated else None
                token = sample(logits, **sampling)
            if gated:
                if self.min_confidence is not None:
                    alive &= top >= self.min_confidence
                if self.stop_below is not None:
                    alive &= chain * top >= self.stop_below
                if not bool(alive.any()):  # every row is below a bar: stop (k = 0: the round is a plain step)
                    self.stopped_early = True
                    break
            tokens.append(token)
            if greedy:  # a row below the bar keeps its guess (its column is verified for the others anyway)
                if gated:
                    chain = chain * top
            else:  # a row below the bar proposes nothing more: it takes the target's own draw from here
                probs.append(q)
                valid.append(alive.clone())
                chain = chain * q.gather(-1, token[:, None])[:, 0].float()
        if not tokens:
            return Proposal(seq.new_zeros(B, 0))
        return Proposal(torch.stack(tokens, 1), torch.stack(probs, 1) if probs else None,
                        torch.stack(valid, 1) if gated and valid else None)

    def rollback(self, length: int) -> None:
        self.cache.truncate(min(self.cache.seq_len, self.true_len, length))


def draft_proposer(draft):
    """The proposer for a draft: `FeatureDraftProposer` for a `FeatureDraft` head, `DraftModelProposer` for a
    model."""
    from llmopt.models.feature_draft import FeatureDraft

    # (adaptive k sizes a head's chains: stop_below measured level or worse on the bench, docs/inference.md)
    return FeatureDraftProposer(draft) if isinstance(draft, FeatureDraft) else DraftModelProposer(draft)


class DraftWithLookupProposer:
    """Prompt lookup first, the draft (a model or a `FeatureDraft` head) otherwise: a round proposes the tokens
    that followed the last earlier occurrence of the sequence's last `min_ngram`..`max_ngram` tokens when every row has such a match
    of at least `min_tokens` tokens (free to find), else the draft's k tokens. Small models' greedy output
    repeats itself (a line, then the same line again), which an n-gram match copies for nothing and a small
    draft often misses. The draft's cache catches up on the skipped tokens at its next round."""

    def __init__(self, draft, *, max_ngram: int = 3, min_ngram: int = 2, min_tokens: int = 1) -> None:
        from llmopt.inference.prompt_lookup import PromptLookupProposer

        self.draft = draft
        self.model_proposer = draft_proposer(draft)
        self.wants_hidden = getattr(self.model_proposer, "wants_hidden", False)
        self.lookup = PromptLookupProposer(max_ngram, min_ngram)
        self.min_tokens = min_tokens
        self.lookup_rounds = 0
        """Rounds whose proposal came from the lookup (the rest: from the draft)."""

    def start(self, target, batch_size: int, max_len: int, padding: torch.Tensor | None) -> None:
        self.model_proposer.start(target, batch_size, max_len, padding)
        self.lookup.start(target, batch_size, max_len, padding)
        self.lookup_rounds = 0

    def propose(self, seq: torch.Tensor, k: int, sampling: dict) -> Proposal:
        found = self.lookup.propose(seq, k, sampling)
        if found.tokens.size(1) >= min(k, self.min_tokens) and \
                (found.valid is None or bool(found.valid[:, :min(k, self.min_tokens)].all())):
            self.lookup_rounds += 1
            return found
        return self.model_proposer.propose(seq, k, sampling)

    def prepare(self, target) -> None:
        if hasattr(self.model_proposer, "prepare"):
            self.model_proposer.prepare(target)

    def observe(self, hidden: torch.Tensor, start: int) -> None:
        self.model_proposer.observe(hidden, start)

    def rollback(self, length: int) -> None:
        self.model_proposer.rollback(length)


# ---- adaptive k ---------------------------------------------------------------------------------
class AdaptiveK:
    """Picks k each round to maximize expected tokens per second from measured costs and acceptance.

    With per-token acceptance rate a, a round of k proposals emits (1 - a^(k+1)) / (1 - a) tokens on
    average and costs k draft steps plus one target forward over k + 1 tokens; k = 0 is a plain decode
    step. Costs are measured (decayed least squares of the target's time against its token count,
    decayed mean of the proposer's time per token), so a poor or slow proposer is switched off; while
    off, a round proposes one token to re-measure the acceptance after `probe_every` idle rounds, and the
    wait doubles after each rejected probe (up to `max_probe_every`): a probe costs a draft catch-up and a
    verify token more, which with a draft that never agrees cost 25% of the speed at every 4th round.
    """

    def __init__(self, k_max: int, adaptive: bool = True, *, decay: float = 0.9, probe_every: int = 4,
                 max_probe_every: int = 64) -> None:
        if k_max < 1:
            raise ValueError(f"k (tokens proposed per round) must be at least 1, got {k_max}")
        self.k_max, self.adaptive, self.decay, self.probe_every = k_max, adaptive, decay, probe_every
        self.max_probe_every = max_probe_every
        self.probe_interval = probe_every  # idle rounds before the next probe (doubles after a rejected one)
        self.probing = False
        self.accepted, self.rejected = 1.0, 1.0  # prior: acceptance 0.5
        self.fit = [0.0] * 5  # decayed sums for t = a + b n: w, n, t, n^2, n t
        self.draft_seconds, self.draft_count = 0.0, 0.0
        self.idle = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, proposed: int, accepted: int, target_tokens: int, target_seconds: float,
                draft_seconds: float) -> None:
        d = self.decay
        if self.probing and proposed:
            self.probe_interval = (self.probe_every if accepted else
                                   min(2 * self.probe_interval, self.max_probe_every))
        self.probing = False
        if proposed:
            self.accepted = d * self.accepted + accepted
            self.rejected = d * self.rejected + (accepted < proposed)
            self.draft_seconds = d * self.draft_seconds + draft_seconds
            self.draft_count = d * self.draft_count + proposed
        n, t = float(target_tokens), target_seconds
        self.fit = [d * s + x for s, x in zip(self.fit, (1.0, n, t, n * n, n * t))]

    def _target_cost(self, n: int) -> float:
        w, sn, st, snn, snt = self.fit
        if w == 0:
            return 1.0 + 0.05 * (n - 1)
        var = snn / w - (sn / w) ** 2
        slope = max((snt / w - sn * st / w ** 2) / var, 0.0) if var > 1e-9 else 0.05 * st / w
        intercept = max(st / w - slope * sn / w, 1e-9)
        # one slow round on a shared machine must not switch speculation off: a token more in the forward
        # costs at most a quarter of a whole forward (k + 1 tokens of a decode step are memory-bound)
        return intercept + min(slope, 0.25 * intercept) * n

    def next_k(self) -> int:
        if not self.adaptive:
            return self.k_max
        a = min(self.acceptance, 0.999)
        draft = self.draft_seconds / self.draft_count if self.draft_count else 0.0
        best, best_rate = 0, 1.0 / self._target_cost(1)
        for k in range(1, self.k_max + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / (self._target_cost(k + 1) + k * draft)
            if rate > best_rate:
                best, best_rate = k, rate
        if best == 0:
            self.idle += 1
            if self.idle >= self.probe_interval:
                self.idle, self.probing = 0, True
                return 1
        else:
            self.idle, self.probe_interval = 0, self.probe_every
        return best


# ---- acceptance ---------------------------------------------------------------------------------
def verify(logits: torch.Tensor, proposal: Proposal, sampling: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept or reject a proposal against the target's logits (B, k + 1, V).

    Returns (n_accepted (B,), out (B, k + 1)): out[:, j] is what the row emits at column j when it keeps
    j draft tokens before it (the draft token itself for j < n_accepted, else a target token).
    """
    drafts = proposal.tokens  # (B, k)
    B, k = drafts.shape
    valid = proposal.valid if proposal.valid is not None else torch.ones_like(drafts, dtype=torch.bool)
    generator = sampling["generator"]
    if sampling["temperature"] == 0:
        out = logits.argmax(-1)  # (B, k + 1)
        accept = (drafts == out[:, :k]) & valid
    else:
        p = logits_to_probs(logits, sampling["temperature"], sampling["top_k"], sampling["top_p"])  # (B, k+1, V)
        if proposal.probs is not None:
            q = proposal.probs * valid[..., None]
        else:
            q = torch.zeros_like(p[:, :k]).scatter_(-1, drafts[..., None], valid[..., None].to(p.dtype))
        p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]
        q_d = q.gather(-1, drafts[..., None])[..., 0]
        ratio = torch.where(q_d > 0, p_d / q_d.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(p_d))
        u = torch.rand(B, k, generator=generator, device=logits.device)
        accept = u < ratio.clamp(max=1.0)
        residual = (p[:, :k] - q).clamp_min(0.0)
        mass = residual.sum(-1, keepdim=True)
        # a zero residual means p == q there, where nothing is ever rejected; fall back to p to stay finite
        residual = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(p.dtype).tiny), p[:, :k])
        dist = torch.cat([residual, p[:, k:]], dim=1)  # (B, k + 1, V)
        race = torch.empty_like(dist).exponential_(1.0, generator=generator).clamp_min_(torch.finfo(dist.dtype).tiny)
        out = (dist / race).argmax(-1)  # one draw per column from its distribution
        out = torch.cat([torch.where(accept, drafts, out[:, :k]), out[:, k:]], dim=1)
    n_accepted = accept.int().cumprod(-1).sum(-1)  # leading run of accepted drafts
    return n_accepted, out


# ---- the loop -----------------------------------------------------------------------------------
@dataclass
class SpeculativeResult(GenerateResult):
    """`GenerateResult` plus acceptance statistics."""

    proposed: int = 0
    """Draft tokens proposed over all rounds (per row: every row sees the same proposals count)."""
    accepted: int = 0
    """Draft tokens kept (the batch's common accepted length, summed over rounds)."""
    accept_counts: list[int] = field(default_factory=list)
    """accept_counts[n]: rounds that kept n draft tokens (index 0 includes rounds with no proposal)."""
    target_forwards: int = 0
    """Target forwards, the prefill included (plain decoding needs one per new token)."""
    ks: list[int] = field(default_factory=list)
    """Tokens proposed in each round (what adaptive k chose)."""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def summary(self) -> dict:
        return {**super().summary(), "proposed": self.proposed, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "accept_counts": self.accept_counts,
                "target_forwards": self.target_forwards, "mean_k": sum(self.ks) / len(self.ks) if self.ks else 0.0}


@torch.no_grad()
def speculative_generate(model, prompt_ids, max_new_tokens: int, *, proposer, k: int = 8, adaptive: bool = True,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         seed: int | None = None, stop_ids: int | Iterable[int] | None = None,
                         cache: KVCache | None = None, pad_id: int = 0,
                         stream: Callable[[torch.Tensor], None] | None = None,
                         kernels: str = "auto") -> SpeculativeResult:
    """Generate like `generate`, with `proposer` guessing up to `k` tokens per target forward.

    `proposer`: `DraftModelProposer(draft)` or `PromptLookupProposer()`. `adaptive`: choose k per round
    from the measured acceptance and costs (up to `k`); False proposes exactly k (tests, statistics).
    `stream(tokens)` gets each emitted column, shape (B,), as in `generate`. `kernels`: as in `generate` (the
    draft model's linears too).
    """
    _check_kernels(kernels)
    if hasattr(proposer, "prepare"):  # before the kernels copy the draft's weights
        proposer.prepare(model)
    with cpu_linear_kernels(model, getattr(proposer, "draft", None), enabled=kernels == "auto"):
        return _speculative_generate(model, prompt_ids, max_new_tokens, proposer=proposer, k=k, adaptive=adaptive,
                                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                     stop_ids=stop_ids, cache=cache, pad_id=pad_id, stream=stream)


def _speculative_generate(model, prompt_ids, max_new_tokens: int, *, proposer, k: int, adaptive: bool,
                          temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
                          stop_ids, cache: KVCache | None, pad_id: int,
                          stream: Callable[[torch.Tensor], None] | None) -> SpeculativeResult:
    device = next(model.parameters()).device
    idx, padding = _prepare_prompts(prompt_ids, device, pad_id)
    B, T = idx.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    controller = AdaptiveK(k, adaptive)
    needed = T + max_new_tokens
    if cache is None:
        if needed > model.config.max_seq_len:
            raise ValueError(f"prompt + new tokens = {needed} exceeds the model's max_seq_len="
                             f"{model.config.max_seq_len}; shorten the prompt or generate fewer tokens")
        cache = make_cache(model, B, needed)
    elif needed > cache.max_len:
        raise _max_len_error(needed, cache.max_len)
    if cache.static:
        raise ValueError("speculative decoding needs a dynamic cache (static=False): it feeds k + 1 tokens per step")
    cache.reset()
    cache.set_key_padding(padding)
    proposer.start(model, B, needed + 1, padding)
    generator = _make_generator(seed, device)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    stopper = _Stopper(stop_ids, B, device)

    wants_hidden = getattr(proposer, "wants_hidden", False)  # a feature draft reads the target's hidden states
    _sync(device)
    start = time.perf_counter()
    if wants_hidden:
        hidden = model.hidden_states(idx, input_pos=torch.arange(T, device=device), cache=cache)
        proposer.observe(hidden, 0)
        token = stopper(sample(model.lm_head(hidden[:, -1]), **sampling))
    else:
        token = stopper(sample(prefill(model, idx, cache), **sampling))
    _sync(device)
    prefill_seconds = time.perf_counter() - start
    if stream is not None:
        stream(token)
    seq = torch.cat([idx, token[:, None]], dim=1)  # (B, S): the last token is not in the target cache yet
    result = SpeculativeResult(tokens=seq, prompt_len=T, num_new_tokens=[], prefill_seconds=prefill_seconds,
                               decode_seconds=0.0, accept_counts=[0] * (k + 1), target_forwards=1)

    start = time.perf_counter()
    while seq.size(1) < needed and not stopper.done():
        S = seq.size(1)
        k_round = controller.next_k()
        if k_round > 0 and getattr(proposer, "sizes_itself", False):  # the proposer's confidence sizes the chain
            k_round = controller.k_max
        k_round = min(k_round, needed - S - 1)
        t0 = time.perf_counter()
        proposal = proposer.propose(seq, k_round, sampling) if k_round > 0 else Proposal(seq.new_zeros(B, 0))
        t1 = time.perf_counter()
        # a chain the proposer stopped on its confidence before its first token counts for adaptive k as one
        # rejected token (the draft step was paid for nothing), so a draft that never trusts itself is switched off
        unsure = k_round > 0 and proposal.tokens.size(1) == 0 and getattr(proposer, "stopped_early", False)
        k_round = proposal.tokens.size(1)
        x = torch.cat([seq[:, -1:], proposal.tokens], dim=1)  # (B, k + 1)
        input_pos = torch.arange(S - 1, S + k_round, device=device)
        if wants_hidden:
            hidden = model.hidden_states(x, input_pos=input_pos, cache=cache)
            logits = model.lm_head(hidden)  # (B, k + 1, V)
        else:
            logits = model(x, input_pos=input_pos, cache=cache)  # (B, k + 1, V)
        if k_round == 0:
            n, out = 0, sample(logits[:, -1], **sampling)[:, None]
        else:
            n_rows, out = verify(logits, proposal, sampling)
            if stopper.stop is not None:  # finished rows do not hold the others back
                n_rows = torch.where(stopper.finished, k_round, n_rows)
            n = int(n_rows.min())  # the one host sync per round
        _sync(device)
        controller.observe(max(k_round, int(unsure)), n, k_round + 1, time.perf_counter() - t1, t1 - t0)
        cache.truncate(S + n)  # keeps seq[-1] and the n accepted drafts; the emitted token n + 1 is fed next round
        proposer.rollback(S + n)
        if wants_hidden:
            proposer.observe(hidden[:, :n + 1], S - 1)  # the target's states at seq[-1] and the n kept drafts
        emitted = [stopper(out[:, j]) for j in range(n + 1)]
        if stream is not None:
            for column in emitted:
                stream(column)
        seq = torch.cat([seq, torch.stack(emitted, 1)], dim=1)
        result.proposed += k_round
        result.accepted += n
        result.accept_counts[n] += 1
        result.target_forwards += 1
        result.ks.append(k_round)
    _sync(device)
    result.decode_seconds = time.perf_counter() - start
    counts = stopper.counts(seq[:, T:])
    if stopper.stop is not None:  # the last round may have emitted columns after every row stopped
        seq = seq[:, : T + max(counts)]
    result.tokens = seq
    result.decode_steps = seq.size(1) - T - 1
    result.num_new_tokens = counts
    result.prompt_padding = padding
    return result
