"""Train the EVICT testbed: a small Qwen3-MoE target and its EAGLE-3 drafter, on CPU, deterministically.

Why: the project has no GPU and no model-hub access, yet the reference engine, the profiler and the
benchmark need a *real* target/drafter pair whose routing and acceptance behave like trained models
(random routers give uniform expert unions, random drafters accept nothing). This script builds that
pair from data every machine has -- the Python standard library's source -- in about half an hour on
two CPU cores.

Stages (all seeded; ``--stage all`` runs them in order):

1. corpus: sorted ``*.py`` files of ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` and
   ``__pycache__`` excluded); every ``--holdout-every``-th file is held out.
2. tokenizer: ByteLevel BPE (``--vocab-size`` tokens) trained on the training files, saved in HF format.
3. target: ``transformers.Qwen3MoeForCausalLM`` trained for ``--target-steps`` AdamW steps.
4. drafter: EAGLE-3 drafter trained on the target's auxiliary hidden states with training-time test
   (``--ttt-steps`` unrolled steps), saved in SGLang's ``LlamaForCausalLMEagle3`` layout.
5. eval: held-out target loss, drafter per-step accuracy, chain-draft accepted length -> ``metrics.json``.

Usage::

    python scripts/train_testbed.py --out evict/testbed            # full run (~30 min, 2 cores)
    python scripts/train_testbed.py --out /tmp/tb --smoke          # tiny, ~1 min, for tests
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

from evict.corpus import corpus_split, read_source

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EOS = "<|endoftext|>"


def log(msg: str) -> None:
    """Print with a wall-clock stamp, flushed (the full run is followed through a log file)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_all(seed: int) -> None:
    """Seed every RNG the training touches so a rerun reproduces the same weights."""
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- corpus / tokenizer


def corpus_files(holdout_every: int) -> tuple[list[Path], list[Path]]:
    """Return (train, held-out) stdlib source files: the package's one split (``evict.corpus``)."""
    return corpus_split(holdout_every)


read_text = read_source


def train_tokenizer(files: list[Path], vocab_size: int, max_bytes: int, out_dir: Path):
    """Train a ByteLevel BPE on (a deterministic prefix of) the training files and save it in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts, total = [], 0
    for f in files:
        t = read_text(f)
        texts.append(t)
        total += len(t)
        if total >= max_bytes:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    log(f"tokenizer: {tok.get_vocab_size()} tokens from {len(texts)} files ({total / 1e6:.1f} MB)")
    return hf


def encode_files(tokenizer, files: list[Path], max_tokens: int) -> torch.Tensor:
    """Concatenate files (each followed by EOS) into one int32 token stream of at most max_tokens."""
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    batch = 64
    for i in range(0, len(files), batch):
        texts = [read_text(f) for f in files[i : i + batch]]
        for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
            ids.append(eos_id)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.int32)


def shuffled(files: list[Path], seed: int) -> list[Path]:
    """A seeded permutation of the file list (so the token budget samples the whole library)."""
    rng = random.Random(seed)
    out = list(files)
    rng.shuffle(out)
    return out


def sample_batch(stream: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows of seq+1 tokens from the stream, int64 [batch, seq+1]."""
    starts = torch.randint(0, stream.numel() - seq - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(seq + 1)[None, :]
    return stream[idx].long()


def eval_windows(stream: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """n evenly spaced, non-random windows of seq+1 tokens (a fixed held-out evaluation set)."""
    n = min(n, max(1, (stream.numel() - 1) // (seq + 1)))
    step = (stream.numel() - seq - 1) // n
    return torch.stack([stream[i * step : i * step + seq + 1] for i in range(n)]).long()


# ----------------------------------------------------------------------------- target


def target_config(args, tokenizer):
    """The HF Qwen3-MoE config of the testbed target (proportions chosen so drafting is cheap)."""
    from transformers import Qwen3MoeConfig

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_experts=args.experts,
        num_experts_per_tok=args.topk,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=4096,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        router_aux_loss_coef=args.router_aux_coef,
        output_router_logits=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def eval_target(model, windows: torch.Tensor, batch: int = 8) -> dict:
    """Held-out mean token loss, perplexity and top-1 accuracy of an HF causal LM."""
    model.eval()
    tot_loss, tot_correct, n = 0.0, 0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i : i + batch]
        logits = model(input_ids=w[:, :-1]).logits.float()
        tgt = w[:, 1:]
        tot_loss += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"
        ).item()
        tot_correct += (logits.argmax(-1) == tgt).sum().item()
        n += tgt.numel()
    model.train()
    loss = tot_loss / n
    return {"loss": loss, "ppl": math.exp(loss), "top1": tot_correct / n, "tokens": n}


def train_target(args, tokenizer, train_stream, held_windows, out_dir: Path):
    """Train the HF Qwen3-MoE target for args.target_steps steps and save it (bf16) with the tokenizer."""
    from transformers import Qwen3MoeForCausalLM

    seed_all(args.seed)
    cfg = target_config(args, tokenizer)
    model = Qwen3MoeForCausalLM(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"target: {n_params / 1e6:.1f}M parameters, {args.target_steps} steps of {args.batch}x{args.seq}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()
    for step in range(args.target_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.target_steps, args.lr, args.warmup)
        b = sample_batch(train_stream, args.batch, args.seq, gen)
        out = model(input_ids=b[:, :-1], output_router_logits=True)
        logits = out.logits.float()
        lm_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1)
        )
        loss = lm_loss + cfg.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.target_steps - 1:
            el = time.time() - t0
            log(
                f"target step {step}/{args.target_steps} loss {lm_loss.item():.3f} aux {out.aux_loss.item():.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {el:.0f}s ({(step + 1) / el:.2f} step/s)"
            )
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            log(f"target held-out @ {step}: {eval_target(model, held_windows[:16])}")
    train_s = time.time() - t0
    metrics = eval_target(model, held_windows)
    log(f"target held-out: {metrics}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(str(out_dir), max_shard_size="30MB")  # files < 30 MB
    tokenizer.save_pretrained(str(out_dir))
    _patch_config_for_sglang(out_dir / "config.json")
    model.to(torch.float32)
    return model, {
        "train_seconds": train_s,
        "params": n_params,
        **{f"heldout_{k}": v for k, v in metrics.items()},
    }


def _patch_config_for_sglang(path: Path) -> None:
    """Add the flat ``rope_theta`` key next to ``rope_parameters`` (older readers, e.g. SGLang, use it)."""
    cfg = json.loads(path.read_text())
    rp = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
    cfg.setdefault("num_experts", cfg.get("num_local_experts"))
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- drafter


def draft_vocabulary(stream: torch.Tensor, vocab: int, size: int) -> tuple[torch.Tensor, float]:
    """The `size` most frequent target tokens of the training stream (ties -> lower id), sorted by id,
    and the fraction of training tokens they cover (EAGLE-3's reduced draft vocabulary)."""
    counts = torch.bincount(stream.long(), minlength=vocab).double()
    # stable descending sort: ties keep the lower id first
    order = torch.sort(-counts, stable=True).indices[:size]
    ids = order.sort().values
    return ids, float(counts[ids].sum() / counts.sum())


@torch.no_grad()
def precompute(target, windows: torch.Tensor, batch: int, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Target aux hidden states (fp16, [N, T, 3H]) and greedy argmax ([N, T]) for fixed windows."""
    n, t = windows.shape
    aux = torch.empty(n, t, 3 * target.config.hidden_size, dtype=torch.float16)
    arg = torch.empty(n, t, dtype=torch.long)
    pos = torch.arange(t).expand(batch, t)
    t0 = time.time()
    for i in range(0, n, batch):
        w = windows[i : i + batch]
        out = target(w, pos[: w.shape[0]])
        aux[i : i + batch] = out.aux_hidden.to(torch.float16)
        arg[i : i + batch] = out.logits.argmax(-1)
    log(f"precomputed {tag}: {n}x{t} tokens in {time.time() - t0:.0f}s")
    return aux, arg


def ttt_forward(drafter, aux: torch.Tensor, tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """EAGLE-3 training-time test: unroll `steps` drafter steps, each feeding its own hidden output back.

    Row t of step k stands for the draft of position t+k+2 made from the target hidden of position t:
    its input token is tokens[t+1+k] (zero past the end), its rotary position t+k, and it attends the
    step-0 keys of rows 0..t (the drafter cache after a draft-extend) plus its own keys of steps 1..k
    (the chain so far) -- exactly what the drafter sees at inference. Returns draft logits per step.
    """
    import torch.nn.functional as F

    from evict.models.common import apply_rope, rope_cos_sin

    b, t = tokens.shape
    ml = drafter.midlayer
    a = ml.self_attn
    nh, nkv, hd = ml.n_heads, ml.n_kv, ml.head_dim
    rep = nh // nkv
    h = drafter.project(aux.float())
    pad = torch.zeros(b, steps + 1, dtype=tokens.dtype)
    toks = torch.cat([tokens, pad], 1)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    k0 = v0 = None
    diag_k: list[torch.Tensor] = []
    diag_v: list[torch.Tensor] = []
    scale = hd**-0.5
    outs = []
    for k in range(steps):
        ids = toks[:, 1 + k : 1 + k + t]
        emb = drafter.embed_tokens(ids).detach()
        x = torch.cat([ml.input_layernorm(emb), ml.hidden_norm(h)], -1)
        q = a.q_proj(x).view(b, t, nh, hd).transpose(1, 2)
        kk = a.k_proj(x).view(b, t, nkv, hd).transpose(1, 2)
        vv = a.v_proj(x).view(b, t, nkv, hd).transpose(1, 2)
        pos = (torch.arange(t) + k).expand(b, t)
        cos, sin = rope_cos_sin(pos, hd, drafter.rope_theta, q.dtype)
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
        kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
        if k == 0:
            k0, v0 = kk, vv
        else:
            diag_k.append(kk)
            diag_v.append(vv)
        s0 = (q @ k0.transpose(-1, -2)) * scale
        s0 = s0.masked_fill(~causal, float("-inf"))
        sd = [(q * dk).sum(-1, keepdim=True) * scale for dk in diag_k]
        p = torch.softmax(torch.cat([s0, *sd], -1), -1)
        att = p[..., :t] @ v0
        for j, dv in enumerate(diag_v):
            att = att + p[..., t + j : t + j + 1] * dv
        att = a.o_proj(att.transpose(1, 2).reshape(b, t, nh * hd))
        res = h + att
        hn = ml.post_attention_layernorm(res)
        m = ml.mlp
        h = res + m.down_proj(F.silu(m.gate_proj(hn)) * m.up_proj(hn))
        outs.append(drafter.lm_head(drafter.norm(h)))
    return outs


def ttt_labels(argmax: torch.Tensor, t2d_index: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Labels per step in draft ids: target argmax at position t+1+k, -100 where absent/out of vocab."""
    b, t = argmax.shape
    labels = []
    for k in range(steps):
        lab = torch.full((b, t), -100, dtype=torch.long)
        lab[:, : t - 1 - k] = t2d_index[argmax[:, 1 + k :]]
        labels.append(lab)
    return labels


def train_drafter(args, train_stream: torch.Tensor, held_windows: torch.Tensor, out: Path) -> dict:
    """Train the EAGLE-3 drafter on precomputed target states with training-time test; save it."""
    from evict.models import Eagle3Drafter, Qwen3MoeTarget, eagle3_config

    seed_all(args.seed + 100)
    target = Qwen3MoeTarget.from_pretrained(out / "target").eval()
    for p in target.parameters():
        p.requires_grad_(False)
    V = target.config.vocab_size
    draft_ids, coverage = draft_vocabulary(train_stream, V, args.draft_vocab)
    log(f"draft vocabulary: {draft_ids.numel()} tokens cover {coverage:.1%} of training tokens")
    cfg = eagle3_config(
        target.config,
        draft_vocab_size=draft_ids.numel(),
        aux_layer_ids=target.aux_layer_ids,
        intermediate_size=args.drafter_intermediate,
    )
    drafter = Eagle3Drafter.from_config(cfg, target)
    drafter.set_vocab_map(draft_ids)
    drafter.train()
    t2d_index = torch.full((V,), -100, dtype=torch.long)
    t2d_index[draft_ids] = torch.arange(draft_ids.numel())

    gen = torch.Generator().manual_seed(args.seed + 2)
    windows = sample_batch(train_stream, args.drafter_seqs, args.seq - 1, gen)  # [N, seq]
    t0 = time.time()
    aux, arg = precompute(target, windows, 16, "train windows")
    pre_s = time.time() - t0

    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.drafter_lr, betas=(0.9, 0.95), weight_decay=0.0)
    weights = [0.8**k for k in range(args.ttt_steps)]
    t0 = time.time()
    n = windows.shape[0]
    for step in range(args.drafter_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.drafter_steps, args.drafter_lr, max(1, args.drafter_steps // 20))
        idx = torch.randint(0, n, (args.drafter_batch,), generator=gen)
        logits = ttt_forward(drafter, aux[idx], windows[idx], args.ttt_steps)
        labels = ttt_labels(arg[idx], t2d_index, args.ttt_steps)
        losses = [
            torch.nn.functional.cross_entropy(
                lg.float().reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100
            )
            for lg, lb in zip(logits, labels)
        ]
        loss = sum(w * lo for w, lo in zip(weights, losses))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.drafter_steps - 1:
            with torch.no_grad():
                accs = [
                    ((lg.argmax(-1) == lb) & (lb >= 0)).sum().item() / max(1, (lb >= 0).sum().item())
                    for lg, lb in zip(logits, labels)
                ]
            el = time.time() - t0
            log(
                f"drafter step {step}/{args.drafter_steps} loss {loss.item():.3f} "
                f"acc {' '.join(f'{a:.2f}' for a in accs)} {el:.0f}s ({(step + 1) / el:.2f} step/s)"
            )
    train_s = time.time() - t0
    drafter.eval()
    drafter.save_pretrained(out / "drafter")
    return {
        "train_seconds": train_s,
        "precompute_seconds": pre_s,
        "draft_vocab": int(draft_ids.numel()),
        "draft_vocab_coverage": coverage,
        "params": sum(p.numel() for p in params),
    }


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def chain_speculative_greedy(target, drafter, prompt: torch.Tensor, new_tokens: int, depth: int):
    """Greedy speculative decoding with a chain draft of `depth` tokens (batch 1, KV caches).

    Returns (generated ids, accepted lengths per verify step). The output must equal plain greedy
    decoding of the target -- checked by the caller.
    """
    p = prompt.numel()
    max_len = p + new_tokens + depth + 2
    tc, dc = target.new_cache(1, max_len), drafter.new_cache(1, max_len)
    ids = prompt.view(1, -1)
    out = target(ids, torch.arange(p)[None], tc)
    tc.commit(torch.arange(p)[None], torch.tensor([p]))
    nxt = out.logits[0, -1].argmax().view(1, 1)
    gen = [int(nxt)]
    # draft extend over the prompt: row t = (hidden_t, token_{t+1}), position t
    toks = torch.cat([ids[:, 1:], nxt], 1)
    dl, dh = drafter(toks, out.aux_hidden, torch.arange(p)[None], dc)
    dc.commit(torch.arange(p)[None], torch.tensor([p]))
    accepted = []
    while len(gen) < new_tokens:
        # chain: d_1 from the last extend row, then feed own hidden back
        base = int(dc.lengths[0])
        chain = [int(drafter.draft_to_target(dl[0, -1].argmax()))]
        h = dh[:, -1:]
        for j in range(1, depth):
            lg, h = drafter(torch.tensor([[chain[-1]]]), h, torch.tensor([[base - 1 + j]]), dc)
            dc.commit(dc.lengths[:, None].clone(), torch.tensor([1]))
            chain.append(int(drafter.draft_to_target(lg[0, -1].argmax())))
        dc.lengths[0] = base
        # verify [last, d_1..d_D]
        L = int(tc.lengths[0])
        vin = torch.tensor([[gen[-1], *chain]])
        vout = target(vin, (L + torch.arange(depth + 1))[None], tc)
        g = vout.logits[0].argmax(-1).tolist()
        n = 0
        while n < depth and chain[n] == g[n]:
            n += 1
        new = chain[:n] + [g[n]]
        accepted.append(n + 1)
        tc.commit((L + torch.arange(n + 1))[None], torch.tensor([n + 1]))
        # draft extend over the accepted tokens: hidden of positions L..L+n, tokens new
        dl, dh = drafter(
            torch.tensor([new]), vout.aux_hidden[:, : n + 1], (L + torch.arange(n + 1))[None], dc
        )
        dc.commit((L + torch.arange(n + 1))[None], torch.tensor([n + 1]))
        gen.extend(new)
    return gen[:new_tokens], accepted


def _median_ms(fn, reps: int = 30) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def evaluate_pair(args, held_stream: torch.Tensor, held_windows: torch.Tensor, out: Path) -> dict:
    """Held-out quality of the shipped (bf16) pair, loaded exactly as the engine loads it."""
    from evict.models import Eagle3Drafter, Qwen3MoeTarget

    seed_all(args.seed + 200)
    target = Qwen3MoeTarget.from_pretrained(out / "target").eval()
    drafter = Eagle3Drafter.from_pretrained(out / "drafter", target).eval()
    res: dict = {}
    # target loss / perplexity / top-1 on held-out windows
    tot, correct, n = 0.0, 0, 0
    pos = torch.arange(held_windows.shape[1] - 1)
    for i in range(0, held_windows.shape[0], 8):
        w = held_windows[i : i + 8]
        lg = target(w[:, :-1], pos.expand(w.shape[0], -1)).logits
        tot += torch.nn.functional.cross_entropy(
            lg.reshape(-1, lg.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"
        ).item()
        correct += (lg.argmax(-1) == w[:, 1:]).sum().item()
        n += w[:, 1:].numel()
    res["target_heldout_loss"] = tot / n
    res["target_heldout_ppl"] = math.exp(tot / n)
    res["target_heldout_top1"] = correct / n
    res["heldout_tokens"] = n
    # drafter per-step top-1 agreement with the target argmax (training-time-test unroll)
    V = target.config.vocab_size
    t2d_index = torch.full((V,), -100, dtype=torch.long)
    draft_ids = drafter.draft_to_target(torch.arange(drafter.d2t.numel()))
    t2d_index[draft_ids] = torch.arange(draft_ids.numel())
    wins = held_windows[:, :-1]
    aux, arg = precompute(target, wins, 8, "held-out windows")
    steps = max(args.ttt_steps, 5)
    hits = [0] * steps
    cnt = [0] * steps
    for i in range(0, wins.shape[0], 8):
        logits = ttt_forward(drafter, aux[i : i + 8], wins[i : i + 8], steps)
        tgt = arg[i : i + 8]
        for k, lg in enumerate(logits):
            pred = drafter.draft_to_target(lg.argmax(-1))[:, : wins.shape[1] - 1 - k]
            lab = tgt[:, 1 + k :]
            hits[k] += (pred == lab).sum().item()
            cnt[k] += lab.numel()
    res["drafter_top1_by_step"] = [h / max(1, c) for h, c in zip(hits, cnt)]
    # chain speculative decoding (greedy) on held-out prompts
    depth = 5
    acc_all: list[int] = []
    n_prompts = 4 if args.smoke else 12
    plen, new = (32, 24) if args.smoke else (128, 64)
    step = max(1, (held_stream.numel() - plen - 1) // n_prompts)
    for j in range(n_prompts):
        prompt = held_stream[j * step : j * step + plen].long()
        gen, acc = chain_speculative_greedy(target, drafter, prompt, new, depth)
        if j == 0:  # speculative greedy must reproduce plain greedy decoding
            ref, ids = [], prompt.view(1, -1)
            for _ in range(new):
                t_ = ids.shape[1]
                nxt = target(ids, torch.arange(t_)[None]).logits[0, -1].argmax()
                ref.append(int(nxt))
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if ref != gen:
                raise RuntimeError("speculative greedy decoding diverged from plain greedy decoding")
        acc_all.extend(acc)
    res["chain_depth"] = depth
    res["chain_mean_accepted_length"] = sum(acc_all) / len(acc_all)
    res["chain_verify_steps"] = len(acc_all)
    # latency proportions (context 256)
    ctx = 256
    tc = target.new_cache(1, ctx + 70)
    ids = held_stream[:ctx].long().view(1, -1)
    o = target(ids, torch.arange(ctx)[None], tc)
    tc.commit(torch.arange(ctx)[None], torch.tensor([ctx]))
    dc = drafter.new_cache(1, ctx + 70)
    drafter(ids, o.aux_hidden, torch.arange(ctx)[None], dc)
    dc.commit(torch.arange(ctx)[None], torch.tensor([ctx]))
    lat = {}
    for t_ in (1, 8, 64):
        x = torch.randint(0, V, (1, t_), generator=torch.Generator().manual_seed(t_))
        p = (ctx + torch.arange(t_))[None]
        lat[t_] = _median_ms(lambda x=x, p=p: target(x, p, tc))
    h1 = o.aux_hidden[:, -1:]
    d_ms = _median_ms(lambda: drafter(ids[:, -1:], h1, torch.tensor([[ctx]]), dc))
    res["verify_ms_ctx256"] = {str(k): v for k, v in lat.items()}
    res["draft_step_ms_ctx256"] = d_ms
    res["draft_verify_ratio"] = d_ms / lat[1]
    res["torch_threads"] = torch.get_num_threads()
    log(f"eval: {json.dumps(res, indent=1)}")
    return res


# ----------------------------------------------------------------------------- main


def finalize_dir(out: Path) -> None:
    """Portable tokenizer class name (older transformers readers) and world-readable files."""
    tc = out / "target" / "tokenizer_config.json"
    if tc.is_file():
        cfg = json.loads(tc.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg.pop("backend", None)
        tc.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in out.rglob("*"):
        if f.is_file():
            f.chmod(0o644)


#: Named testbeds: each is a set of flag defaults (``--preset NAME``). ``moe128`` has Qwen3-30B-A3B's
#: routing shape (128 experts, top-8, normalized top-k) at a size that trains in about half an hour on two
#: cores and ships in about 22 MB; it shares the first pair's tokenizer, corpus split and held-out files.
PRESETS: dict[str, dict] = {
    "moe128": {
        "out": REPO / "evict" / "testbed_moe128",
        "tokenizer_from": REPO / "evict" / "testbed" / "target",
        "hidden": 128,
        "layers": 8,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 32,
        "experts": 128,
        "topk": 8,
        "moe_intermediate": 24,
        "target_steps": 1200,
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "evict" / "testbed")
    p.add_argument("--stage", choices=["all", "target", "drafter", "eval"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny sizes and step counts (a ~1 minute check)")
    p.add_argument("--holdout-every", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer-bytes", type=int, default=24_000_000)
    p.add_argument("--train-tokens", type=int, default=6_000_000)
    p.add_argument("--held-tokens", type=int, default=400_000)
    # target
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--moe-intermediate", type=int, default=96)
    p.add_argument("--router-aux-coef", type=float, default=0.001)
    p.add_argument("--target-steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=2.5e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-windows", type=int, default=64)
    # drafter
    p.add_argument("--draft-vocab", type=int, default=2048)
    p.add_argument("--drafter-steps", type=int, default=600)
    p.add_argument("--drafter-seqs", type=int, default=1024)
    p.add_argument("--drafter-batch", type=int, default=16)
    p.add_argument("--drafter-lr", type=float, default=2e-3)
    p.add_argument("--ttt-steps", type=int, default=4)
    p.add_argument("--drafter-intermediate", type=int, default=512)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="a named testbed's sizes (moe128: Qwen3-30B-A3B's routing shape); explicit flags still win",
    )
    p.add_argument(
        "--tokenizer-from",
        type=Path,
        default=None,
        help="reuse this directory's tokenizer instead of training one (moe128 shares the first pair's)",
    )
    pre, _ = p.parse_known_args(argv)
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    args = p.parse_args(argv)
    if args.smoke:
        args.tokenizer_bytes, args.train_tokens, args.held_tokens = 2_000_000, 300_000, 40_000
        args.vocab_size, args.hidden, args.layers, args.experts, args.topk = 512, 64, 4, 8, 2
        args.heads, args.kv_heads, args.head_dim, args.moe_intermediate = 4, 2, 16, 32
        args.target_steps, args.batch, args.seq, args.warmup, args.eval_every = 20, 4, 64, 5, 0
        args.draft_vocab, args.drafter_steps, args.drafter_seqs, args.drafter_batch = 256, 20, 32, 4
        args.eval_windows, args.log_every = 8, 5
    return args


def prepare_data(args, out: Path):
    """Corpus split, tokenizer (trained once, reused if already in out/target) and token streams."""
    from transformers import AutoTokenizer

    train_files, held_files = corpus_files(args.holdout_every)
    log(f"corpus: {len(train_files)} train files, {len(held_files)} held-out files")
    tdir = out / "target"
    if args.tokenizer_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer_from))
        tokenizer.save_pretrained(str(tdir))
        log(f"tokenizer: {len(tokenizer)} tokens, reused from {args.tokenizer_from}")
    elif (tdir / "tokenizer.json").exists() and args.stage != "all":
        tokenizer = AutoTokenizer.from_pretrained(str(tdir))
    else:
        tokenizer = train_tokenizer(
            shuffled(train_files, args.seed), args.vocab_size, args.tokenizer_bytes, tdir
        )
    t0 = time.time()
    train_stream = encode_files(tokenizer, shuffled(train_files, args.seed + 7), args.train_tokens)
    held_stream = encode_files(tokenizer, held_files, args.held_tokens)
    log(f"tokens: train {train_stream.numel()}, held-out {held_stream.numel()} ({time.time() - t0:.0f}s)")
    return tokenizer, train_stream, held_stream


def args_record(args: argparse.Namespace) -> dict:
    """The run's arguments for metrics.json; paths inside the repo relative to it, so the shipped
    file names no machine's folders."""

    def plain(v):
        if not isinstance(v, Path):
            return v
        try:
            return v.resolve().relative_to(REPO).as_posix()
        except ValueError:
            return str(v)

    return {k: plain(v) for k, v in vars(args).items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    tokenizer, train_stream, held_stream = prepare_data(args, out)
    held_windows = eval_windows(held_stream, args.eval_windows, args.seq)
    metrics: dict = {}
    mpath = out / "metrics.json"
    if mpath.exists() and args.stage != "all":
        metrics = json.loads(mpath.read_text())
    metrics["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if args.stage in ("all", "target"):
        _, tm = train_target(args, tokenizer, train_stream, held_windows, out / "target")
        metrics["target"] = tm
        metrics["target_args"] = args_record(args)
        mpath.write_text(json.dumps(metrics, indent=2) + "\n")
    if args.stage in ("all", "drafter"):
        metrics["drafter"] = train_drafter(args, train_stream, held_windows, out)
        metrics["drafter_args"] = args_record(args)
        mpath.write_text(json.dumps(metrics, indent=2) + "\n")
    if args.stage in ("all", "drafter", "eval"):
        metrics["eval"] = evaluate_pair(args, held_stream, held_windows, out)
    finalize_dir(out)
    metrics.pop("total_seconds", None)
    metrics.setdefault("stage_seconds", {})[args.stage] = time.time() - t_start
    mpath.write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"done in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
