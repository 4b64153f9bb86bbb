"""Train a feature-level draft head (`llmopt.models.feature_draft.FeatureDraft`, EAGLE) for a target model.

    python -m llmopt.recipes.feature_draft --out runs/smollm2-eagle                  # SmolLM2-135M, defaults
    python -m llmopt.recipes.feature_draft --out DIR --continuations-from runs/smollm2-draft-seq/teacher_targets/continuations_...
    python -m llmopt.recipes.feature_draft --out DIR --continuations-from FOLDER --generate-too --continuations 2048 \
        --init-head runs/smollm2-eagle --steps 600 --lr 5e-4          # more rows: reused + new, continuing a head

Steps, in order (each cached under OUT/data/, so a rerun skips what is done):
1. Token sequences: the target's greedy continuations of `--continuations` prompts drawn from the bundled
   corpus (the text a draft is judged on: the target's own output), and `--windows` windows of the corpus
   text itself; held-out continuations of prompts from the corpus tail (where the benchmarks draw theirs).
2. The target's final hidden states over them (one no-grad forward, kept in fp16), and its greedy token at
   every position. The head's vocabulary is the `--vocab` ids the target emits most there.
3. `--steps` AdamW steps. The head reads (h_p, token p+1) and predicts h_{p+1}; the loss is a smooth-L1
   regression on the feature plus the soft cross-entropy of the target's distribution (over the kept ids)
   at p+1. `--unroll S` also trains on its own predictions (EAGLE-3's "training-time test"): pass s feeds
   the predictions of pass s-1, and a query in pass s sees the true-feature keys up to p-s and one
   predicted key per later pass, which is exactly what the s-th drafted token sees when decoding.

Reported (feature_draft.json, info): per-pass top-1 agreement with the target on the held-out
continuations' generated positions (pass s = the s-th drafted token, given the earlier ones were right),
the expected tokens per round it implies, the kept vocabulary's coverage of the target's greedy tokens,
the times of each step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from llmopt.models.feature_draft import FeatureDraft
from llmopt.models.llama import apply_rope


# ---- data ----------------------------------------------------------------------------------------
@torch.no_grad()
def target_features(target, inputs: torch.Tensor, *, batch_size: int = 16,
                    on_batch: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, T, dim) fp16, greedy tokens (N, T)) of the target over token rows `inputs` (N, T)."""
    feats, top1 = [], []
    for i in range(0, inputs.size(0), batch_size):
        h = target.hidden_states(inputs[i:i + batch_size])
        feats.append(h.half())
        top1.append(target.lm_head(h).argmax(-1))
        if on_batch is not None:
            on_batch(min(i + batch_size, inputs.size(0)), inputs.size(0))
    return torch.cat(feats), torch.cat(top1)


FEATURE_BLOCK = 512
"""Rows per cached feature file (the first rows of a grown continuation folder keep their files)."""


def _load_features(path: Path) -> tuple:
    try:
        return torch.load(path)
    except Exception as e:  # a stopped write or a foreign file: say which, and how to rebuild it
        raise ValueError(f"cannot read the cached features {path} ({type(e).__name__}); delete it and rerun to "
                         "rebuild it") from None


@torch.no_grad()
def _init_params(named, std: float, *, output_scale: float) -> None:
    """Weights N(0, std), the blocks' output projections scaled by `output_scale` (0: a new block adds nothing
    to the residual, so a grown head starts as the same function); norms (the 1-d weights) ones."""
    for name, p in named:
        if p.dim() != 2:
            p.fill_(1.0)
        elif not name.endswith(("o_proj.weight", "down_proj.weight")):
            p.normal_(0.0, std)
        elif output_scale:
            p.normal_(0.0, std * output_scale)
        else:
            p.zero_()


def kept_vocabulary(top1: torch.Tensor, inputs: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` ids the target emits most as its greedy token (ties and the rest of the room: the most
    frequent input tokens), sorted."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"--vocab must be in [1, {vocab_size}], got {size}")
    counts = torch.bincount(top1.flatten(), minlength=vocab_size).double()
    counts += 1e-3 * torch.bincount(inputs.flatten(), minlength=vocab_size).double() / max(1, inputs.numel())
    return counts.topk(size).indices.sort().values


# ---- the unrolled forward (training-time test) ------------------------------------------------------
def unrolled_forward(draft: FeatureDraft, feats: torch.Tensor, tokens: torch.Tensor, passes: int) -> list[torch.Tensor]:
    """Predicted features of each pass over rows of target features (B, T, dim) and tokens (B, T).

    Pass 0 reads the true features h_p at positions p = 0..T-2 (with the tokens at p+1) and returns (B, T-1, dim),
    its row p predicting h_{p+1}: the same as `draft(feats[:, :-1], tokens[:, 1:])`. Pass s >= 1 reads pass
    s-1's prediction of h_p at positions p = s..T-2 and returns (B, T-1-s, dim); its query at p attends to
    pass 0's keys at positions <= p-s and to pass r's key at position p-s+r for r = 1..s.
    """
    B, T, _ = feats.shape
    cfg = draft.config
    outs: list[torch.Tensor] = []
    kv: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]] = [[] for _ in draft.layers]
    x_feats, x_tokens, start = feats[:, :-1], tokens[:, 1:], 0
    for s in range(passes):
        pos = torch.arange(start, T - 1, device=feats.device)  # positions p of this pass
        x = draft.mix(x_feats, x_tokens, draft.context_tokens(tokens, start, T - 1))
        cos, sin = draft.rope_cos[pos], draft.rope_sin[pos]
        for li, block in enumerate(draft.layers):
            attn = block.self_attn
            h = block.input_layernorm(x)
            n = h.size(1)
            q = attn.q_proj(h).view(B, n, cfg.n_head, cfg.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(B, n, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(B, n, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
            q, k = apply_rope(q, k, cos, sin)
            kv[li].append((k, v, pos, s))
            keys = torch.cat([e[0] for e in kv[li]], dim=2)
            values = torch.cat([e[1] for e in kv[li]], dim=2)
            allowed = []
            for _, _, kpos, r in kv[li]:
                if r == 0:
                    allowed.append(kpos[None, :] <= (pos - s)[:, None])
                else:
                    allowed.append(kpos[None, :] == (pos - s + r)[:, None])
            mask = torch.cat(allowed, dim=1)  # (n, total keys)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                               enable_gqa=cfg.n_kv_head != cfg.n_head)
            x = x + attn.o_proj(y.transpose(1, 2).reshape(B, n, cfg.n_head * cfg.head_dim))
            x = x + block.mlp(block.post_attention_layernorm(x))
        out = draft.norm(x)
        outs.append(out)
        # the next pass: the prediction of h_p (row p-1 of this pass) at positions p = start+1..T-2
        x_feats, x_tokens, start = out[:, :-1], tokens[:, start + 2:], start + 1
    return outs


def draft_losses(draft: FeatureDraft, outs: list[torch.Tensor], feats: torch.Tensor, top1: torch.Tensor,
                 kept_index: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per pass: (regression loss, soft cross-entropy, top-1 hits (B, n) bool) against the target's features,
    distribution over the kept ids, and greedy token (mapped to the kept index, -1 if not kept)."""
    regs, clss, hits = [], [], []
    with torch.no_grad():
        probs = draft.logits(feats[:, 1:].float()).softmax(-1)  # the target's, over the kept ids, at p = 1..T-1
    for s, out in enumerate(outs):
        target = feats[:, s + 1:].float()  # pass s row p predicts h_{p+1}, rows p = s..T-2
        regs.append(F.smooth_l1_loss(out, target))
        logits = draft.logits(out)
        clss.append(-(probs[:, s:] * logits.log_softmax(-1)).sum(-1).mean())
        want = kept_index[top1[:, s + 1:]]
        hits.append(logits.argmax(-1) == want)
    return regs, clss, hits


# ---- the recipe -------------------------------------------------------------------------------------
def train_feature_draft(out_dir: str | Path, *, target_name: str = "smollm2-135m", continuations: int = 832,
                        continuations_from: str | Path | list[str | Path] | None = None, val_continuations: int = 16,
                        val_continuations_from: str | None = None, windows: int = 256, seq_len: int = 128,
                        prompt_len: int = 33, heldout_chars: int = 30_000, vocab: int = 8192, n_layer: int = 1,
                        steps: int = 700, batch_size: int = 16, lr: float = 1e-3, warmup: int = 40,
                        unroll: int = 3, reg_weight: float = 1.0, noise: float = 0.0, eval_every: int = 50,
                        seed: int = 1337, threads: int | None = None, init_head: str | Path | None = None,
                        generate_too: bool = False, prev_token: bool | int = False,
                        on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Build the data, train the head and save it to `out_dir`; returns the summary (see the module docstring)."""
    from llmopt.data.corpus import default_corpus_text
    from llmopt.data.distill import TeacherTargets, concat_targets, windows as text_windows
    from llmopt.models import load_pretrained
    from llmopt.recipes.distill import cached_continuations, continuation_prompts
    from llmopt.train.loop import lr_at

    if steps < 1 or batch_size < 1 or unroll < 1:
        raise ValueError(f"steps, batch_size and unroll must be at least 1 (got {steps}, {batch_size}, {unroll})")
    if threads:
        torch.set_num_threads(threads)
    log = on_log or (lambda record: None)
    out = Path(out_dir)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    target, tokenizer = load_pretrained(target_name)
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    full = default_corpus_text()
    if len(full) <= heldout_chars + 12 * prompt_len:
        raise ValueError(f"the corpus has {len(full)} characters: too few for heldout_chars={heldout_chars}")
    train_text, heldout = full[:-heldout_chars], full[-heldout_chars:]
    new_tokens = seq_len - prompt_len + 1
    tname = Path(target_name).name  # a name or a run directory
    tag = f"{tname}_{prompt_len}+{new_tokens}x1"

    # 1. sequences
    t0 = time.perf_counter()

    def parts(folder: str | Path) -> TeacherTargets:
        files = sorted(Path(folder).glob("part*.safetensors"))
        if not files:
            raise ValueError(f"{folder} holds no part*.safetensors continuation files (a distill run's "
                             "teacher_targets/continuations_* folder)")
        return concat_targets([TeacherTargets.load(f) for f in files])

    def progress(what):
        return lambda done, total: log({what: done, "of": total, "elapsed_s": round(time.perf_counter() - t0, 1)})

    # reused continuations (distill runs' folders) and/or `continuations` generated here: all are training rows
    if isinstance(continuations_from, (str, Path)):
        continuations_from = [continuations_from]
    conts = [parts(folder).inputs for folder in continuations_from or []]
    if continuations and (not conts or generate_too):
        prompts = continuation_prompts(train_text, continuations, prompt_len, tokenizer, seed=seed)
        conts.append(cached_continuations(target, prompts, new_tokens, data_dir / f"continuations_{tag}_seed{seed}",
                                          top_k=1, batch_size=32, on_batch=progress("continuations")).inputs)
    if val_continuations_from:
        val_inputs = parts(val_continuations_from).inputs
    else:
        prompts = continuation_prompts(heldout, val_continuations, prompt_len, tokenizer, seed=seed + 1)
        val_inputs = cached_continuations(target, prompts, new_tokens, data_dir / f"val_continuations_{tag}",
                                          top_k=1, batch_size=32).inputs
    if any(c.size(1) != seq_len for c in conts + [val_inputs]):
        raise ValueError(f"continuation rows must be {seq_len} tokens (prompt {prompt_len} + {new_tokens - 1}); "
                         f"got {sorted({c.size(1) for c in conts + [val_inputs]})}")
    cont = torch.cat(conts) if conts else torch.empty(0, seq_len, dtype=torch.long)
    text_rows = torch.empty(0, seq_len, dtype=torch.long)
    if windows:
        ids = torch.tensor(tokenizer.encode_large(train_text), dtype=torch.long)
        text_rows = text_windows(ids, seq_len, windows)
    inputs = torch.cat([cont, text_rows])
    if inputs.size(0) == 0:
        raise ValueError("no training rows: set --continuations, --continuations-from or --windows")
    sequence_seconds = time.perf_counter() - t0

    # 2. target features: cached per block of FEATURE_BLOCK rows of each part (each continuation source, the
    # windows, the held-out rows), so a run that adds rows computes only theirs
    t0 = time.perf_counter()
    cache_file = data_dir / f"features_{tname}_{inputs.size(0)}x{seq_len}_{int(inputs.sum())}.pt"
    if cache_file.is_file():  # the whole-run cache of earlier versions
        feats, top1, val_feats, val_top1 = _load_features(cache_file)
    else:
        done = [0]

        def part_features(rows: torch.Tensor, report: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
            if rows.size(0) > FEATURE_BLOCK:  # blocks: a part that grew (more continuations) reuses its old ones
                got = [part_features(rows[i:i + FEATURE_BLOCK], report) for i in range(0, rows.size(0), FEATURE_BLOCK)]
                return torch.cat([f for f, _ in got]), torch.cat([t for _, t in got])
            key = hashlib.sha1(rows.numpy().tobytes()).hexdigest()[:16]
            path = data_dir / f"features_{tname}_{rows.size(0)}x{rows.size(1)}_{key}.pt"
            if path.is_file():
                got = _load_features(path)
            else:
                step = progress("feature_rows") if report else None
                got = target_features(target, rows, on_batch=None if step is None else
                                      (lambda d, n: step(done[0] + d, inputs.size(0))))
                torch.save(got, path)
            done[0] += rows.size(0) if report else 0
            return got

        pieces = [part_features(rows) for rows in conts + [text_rows] if rows.size(0)]
        feats, top1 = torch.cat([f for f, _ in pieces]), torch.cat([t for _, t in pieces])
        val_feats, val_top1 = part_features(val_inputs, report=False)
    feature_seconds = time.perf_counter() - t0

    # 3. the head, and the ids it can propose
    torch.manual_seed(seed)
    previous = None
    if init_head is not None:  # continue a previous run (its kept vocabulary and weights)
        draft = FeatureDraft.load(init_head, target)
        old_layers = draft.config.n_layer
        if old_layers > n_layer:
            raise ValueError(f"--init-head {init_head} has {old_layers} blocks, more than --layers {n_layer}")
        if draft.n_prev > int(prev_token):
            raise ValueError(f"--init-head {init_head} reads {draft.n_prev} previous token(s); add --prev-tokens "
                             f"{draft.n_prev} (or more)")
        vocab_ids, previous = draft.vocab_ids, draft.info
        if int(prev_token) > draft.n_prev or old_layers < n_layer:
            # grow to the same function: fc's new token columns start at zero, and each new block (appended
            # after the old ones) starts with zero output projections, so it adds nothing to the residual
            grown = FeatureDraft(target.config, vocab_ids, n_layer=n_layer, prev_token=prev_token)
            state = grown.state_dict()
            _init_params(((name, p) for name, p in state.items()
                          if name.startswith("layers.") and int(name.split(".")[1]) >= old_layers),
                         target.config.init_std, output_scale=0.0)
            old = draft.state_dict()
            fc, width = old["fc.weight"], state["fc.weight"].size(1)
            if fc.size(1) < width:
                old["fc.weight"] = torch.cat([fc, fc.new_zeros(fc.size(0), width - fc.size(1))], dim=1)
            state.update(old)
            grown.load_state_dict(state)
            draft = grown.attach(target)
    else:
        vocab_ids = kept_vocabulary(top1, inputs, vocab, target.config.vocab_size)
        draft = FeatureDraft(target.config, vocab_ids, n_layer=n_layer, prev_token=prev_token).attach(target)
        _init_params(((name, p) for name, p in draft.named_parameters() if p.requires_grad),
                     target.config.init_std, output_scale=1 / math.sqrt(2 * n_layer))
        with torch.no_grad():
            draft.norm.weight.copy_(target.norm.weight)  # the features are the target's normalized states
    kept_index = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
    kept_index[vocab_ids] = torch.arange(vocab_ids.numel())
    coverage = float((kept_index[top1] >= 0).float().mean())
    val_coverage = float((kept_index[val_top1[:, prompt_len - 1:]] >= 0).float().mean())
    log({"rows": inputs.size(0), "continuation_rows": cont.size(0), "text_rows": text_rows.size(0),
         "val_rows": val_inputs.size(0), "vocab": vocab_ids.numel(), "coverage": round(coverage, 4),
         "val_coverage": round(val_coverage, 4), "feature_seconds": round(feature_seconds, 1)})
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def evaluate() -> dict[str, Any]:
        draft.eval()
        hits = [[] for _ in range(unroll)]
        with torch.no_grad():
            for i in range(0, val_inputs.size(0), 8):
                f, t, g = val_feats[i:i + 8].float(), val_inputs[i:i + 8], val_top1[i:i + 8]
                outs = unrolled_forward(draft, f, t, unroll)
                _, _, h = draft_losses(draft, outs, f, g, kept_index)
                for s in range(unroll):
                    # generated positions only: pass s row p predicts the token at p+2+... ; keep p >= prompt_len-1
                    hits[s].append(h[s][:, max(0, prompt_len - 1 - s):])
        draft.train()
        rates = [float(torch.cat(h).float().mean()) for h in hits]
        expected, run = 1.0, 1.0
        for a in rates:
            run *= a
            expected += run
        return {f"val_top1_pass{s}": round(a, 4) for s, a in enumerate(rates)} | {
            f"expected_tokens_per_round_k{unroll}": round(expected, 3)}

    history = [{"step": 0, **evaluate()}]
    log(history[0])
    g = torch.Generator().manual_seed(seed)
    draft.train()
    t1 = time.perf_counter()
    for step in range(1, steps + 1):
        lr_now = lr_at(step - 1, lr=lr, min_lr=lr / 10, warmup_steps=warmup, total_steps=steps)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        rows = torch.randint(0, inputs.size(0), (batch_size,), generator=g)
        f, t, top = feats[rows].float(), inputs[rows], top1[rows]
        fin = f if noise == 0 else f + noise * f.pow(2).mean().sqrt() * torch.randn(f.shape, generator=g)
        outs = unrolled_forward(draft, fin, t, unroll)
        regs, clss, hits = draft_losses(draft, outs, f, top, kept_index)
        loss = sum(reg_weight * r + c for r, c in zip(regs, clss)) / unroll
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"feature-draft loss became {value} at step {step}; lower --lr")
        record: dict[str, Any] = {}
        if step % 10 == 0 or step == steps:
            record = {"step": step, "loss": round(value, 4), "reg0": round(float(regs[0].detach()), 4),
                      "cls0": round(float(clss[0].detach()), 4),
                      "train_top1": [round(float(h.float().mean()), 3) for h in hits], "lr": round(lr_now, 6),
                      "grad_norm": round(grad_norm, 3), "elapsed_s": round(time.perf_counter() - t1, 1)}
        if step % eval_every == 0 or step == steps:
            record = {"step": step, **record, **evaluate()}
            draft.info = {"history": history + [record]}
            draft.save(out)  # a stopped run keeps its last evaluated head
        if record:
            history.append(record)
            log(record)
    train_seconds = time.perf_counter() - t1
    summary = {"target": target_name, "n_layer": n_layer, "prev_token": draft.n_prev, "vocab": vocab_ids.numel(),
               "coverage": round(coverage, 4),
               "val_coverage": round(val_coverage, 4), "params": draft.num_parameters(trainable_only=True),
               "multiply_adds_per_token": draft.multiply_adds_per_token(),
               "target_multiply_adds_per_token": target.num_parameters(),
               "rows": inputs.size(0), "continuation_rows": cont.size(0), "text_rows": text_rows.size(0),
               "seq_len": seq_len, "steps": steps, "batch_size": batch_size, "lr": lr, "unroll": unroll,
               "noise": noise, "threads": torch.get_num_threads(), "init_head": str(init_head or ""),
               "previous": {k: v for k, v in (previous or {}).items() if k != "history"} or None,
               "sequence_seconds": round(sequence_seconds, 1), "feature_seconds": round(feature_seconds, 1),
               "train_seconds": round(train_seconds, 1), "total_seconds": round(time.perf_counter() - t_start, 1),
               "final": history[-1], "history": history}
    draft.info = summary
    draft.save(out)
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llmopt.recipes.feature_draft", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--continuations", type=int, default=832, help="greedy continuations generated for training")
    p.add_argument("--continuations-from", action="append",
                   help="reuse a folder of part*.safetensors continuations (repeatable); instead of generating, "
                        "unless --generate-too")
    p.add_argument("--generate-too", action="store_true",
                   help="with --continuations-from: also generate --continuations new ones (more training rows)")
    p.add_argument("--val-continuations", type=int, default=16)
    p.add_argument("--val-continuations-from")
    p.add_argument("--windows", type=int, default=256, help="corpus text windows added to the training rows")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=33)
    p.add_argument("--vocab", type=int, default=8192, help="token ids the head can propose")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--prev-token", action="store_true",
                   help="the head also reads the token at each position (a one-layer induction head: copies); with "
                        "--init-head of a head without it, its fc grows zero columns (the same function to start)")
    p.add_argument("--prev-tokens", type=int, default=0,
                   help="the head reads the N tokens at p, p - 1, ... (2: it can match a bigram before copying); "
                        "--prev-token is 1; grows an --init-head that reads fewer the same way")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--unroll", type=int, default=3, help="passes on its own predictions (1 = EAGLE-1)")
    p.add_argument("--reg-weight", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=0.0, help="feature noise, relative to the features' RMS")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--threads", type=int)
    p.add_argument("--init-head", help="continue from this head directory (a previous run's OUT)")
    a = p.parse_args(argv)
    try:
        summary = train_feature_draft(
            a.out, target_name=a.target, continuations=a.continuations, continuations_from=a.continuations_from,
            val_continuations=a.val_continuations, val_continuations_from=a.val_continuations_from,
            windows=a.windows, seq_len=a.seq_len, prompt_len=a.prompt_len, vocab=a.vocab, n_layer=a.layers,
            steps=a.steps, batch_size=a.batch_size, lr=a.lr, unroll=a.unroll, reg_weight=a.reg_weight,
            noise=a.noise, eval_every=a.eval_every, threads=a.threads, init_head=a.init_head,
            generate_too=a.generate_too, prev_token=max(a.prev_tokens, int(a.prev_token)),
            on_log=lambda r: print(json.dumps(r), flush=True))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
