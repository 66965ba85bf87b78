"""Tests of evict.models: HF parity, KV cache, masks, commit, drafter checkpoint layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from evict.models import (
    SGLANG_EAGLE3_WEIGHT_NAMES,
    Eagle3Drafter,
    KVCache,
    Qwen3MoeTarget,
    eagle3_config,
    sglang_param_name,
)

transformers = pytest.importorskip("transformers")


def tiny_config(**kw):
    base = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=128,
        rope_parameters={"rope_theta": 5000.0, "rope_type": "default"},
        tie_word_embeddings=False,
    )
    base.update(kw)
    return transformers.Qwen3MoeConfig(**base)


def make_target(seed=0, **kw) -> Qwen3MoeTarget:
    return Qwen3MoeTarget.from_config(tiny_config(**kw), seed=seed)


def make_drafter(target, seed=1) -> Eagle3Drafter:
    cfg = eagle3_config(target.config, draft_vocab_size=40, aux_layer_ids=[1, 2, 3], intermediate_size=64)
    d = Eagle3Drafter.from_config(cfg, target, seed=seed)
    g = torch.Generator().manual_seed(3)
    d.set_vocab_map(torch.randperm(target.config.vocab_size, generator=g)[:40].sort().values)
    return d


@pytest.mark.parametrize("norm_topk", [True, False])
def test_logits_match_hf(norm_topk):
    torch.manual_seed(0)
    cfg = tiny_config(norm_topk_prob=norm_topk, mlp_only_layers=[2])
    hf = transformers.Qwen3MoeForCausalLM(cfg).eval()
    # HF initialises routers at zero; give them structure so top-k routing is non-trivial
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "mlp.gate.weight" in name or "experts" in name:
                p.normal_(std=0.3)
    ours = Qwen3MoeTarget(cfg)
    ours.load_hf_state_dict(hf.state_dict())
    ours.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    pos = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = ours(ids, pos)
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)
    assert out.aux_hidden.shape == (2, 11, 3 * cfg.hidden_size)


def test_hf_checkpoint_roundtrip(tmp_path: Path):
    """save_pretrained writes the per-expert HF layout that transformers (and SGLang) load."""
    t = make_target()
    t.save_pretrained(tmp_path, dtype=torch.float32)
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(str(tmp_path)).eval()
    t2 = Qwen3MoeTarget.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (1, 9))
    pos = torch.arange(9)[None]
    with torch.no_grad():
        a = t(ids, pos).logits
        torch.testing.assert_close(hf(input_ids=ids).logits, a, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(t2(ids, pos).logits, a)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.7.down_proj.weight" in f.keys()


def test_incremental_decoding_matches_full_forward():
    t = make_target()
    ids = torch.randint(0, 97, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        full = t(ids, pos).logits
        cache = t.new_cache(2, 32)
        out = t(ids[:, :7], pos[:, :7], cache)
        cache.commit(torch.arange(7).expand(2, 7), torch.tensor([7, 7]))
        parts = [out.logits]
        for i in range(7, 12):
            o = t(ids[:, i : i + 1], pos[:, i : i + 1], cache)
            cache.commit(cache.lengths[:, None].clone(), torch.tensor([1, 1]))
            parts.append(o.logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)
    assert cache.lengths.tolist() == [12, 12]


def test_tree_mask_equals_separate_forwards():
    """Two branches verified in one forward with a tree mask give the logits of separate forwards."""
    t = make_target()
    prefix = torch.randint(0, 97, (1, 6))
    a, b = torch.randint(0, 97, (1, 2)), torch.randint(0, 97, (1, 2))
    with torch.no_grad():
        ref_a = t(torch.cat([prefix, a], 1), torch.arange(8)[None]).logits[:, 6:]
        ref_b = t(torch.cat([prefix, b], 1), torch.arange(8)[None]).logits[:, 6:]
        cache = t.new_cache(1, 16)
        t(prefix, torch.arange(6)[None], cache)
        cache.commit(torch.arange(6)[None], torch.tensor([6]))
        tree = torch.cat([a, b], 1)  # slots 6,7 = branch a; 8,9 = branch b
        pos = torch.tensor([[6, 7, 6, 7]])
        mask = torch.zeros(1, 4, 10, dtype=torch.bool)
        mask[..., :6] = True
        for q, allowed in enumerate([[6], [6, 7], [8], [8, 9]]):
            mask[0, q, allowed] = True
        out = t(tree, pos, cache, attn_mask=mask).logits
        torch.testing.assert_close(out[:, :2], ref_a, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[:, 2:], ref_b, atol=1e-4, rtol=1e-4)
        # accept branch b: commit slots 8, 9, then decode one more token
        cache.commit(torch.tensor([[8, 9]]), torch.tensor([2]))
        nxt = torch.randint(0, 97, (1, 1))
        o = t(nxt, torch.tensor([[8]]), cache).logits
        ref = t(torch.cat([prefix, b, nxt], 1), torch.arange(9)[None]).logits[:, -1:]
    torch.testing.assert_close(o, ref, atol=1e-4, rtol=1e-4)


def test_batched_different_lengths_and_padding_mask():
    t = make_target()
    x0, x1 = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 3))
    with torch.no_grad():
        cache = t.new_cache(2, 16)
        ids = torch.cat([x0, torch.cat([x1, torch.zeros(1, 2, dtype=torch.long)], 1)])
        t(ids, torch.arange(5).expand(2, 5), cache)
        cache.commit(torch.arange(5).expand(2, 5), torch.tensor([5, 3]))
        nxt = torch.randint(0, 97, (2, 1))
        out = t(nxt, torch.tensor([[5], [3]]), cache).logits  # default mask hides slots 3, 4 of request 1
        r0 = t(torch.cat([x0, nxt[:1]], 1), torch.arange(6)[None]).logits[:, -1:]
        r1 = t(torch.cat([x1, nxt[1:]], 1), torch.arange(4)[None]).logits[:, -1:]
    torch.testing.assert_close(out, torch.cat([r0, r1]), atol=1e-4, rtol=1e-4)


def test_logits_at_one_position_per_request_are_the_full_forwards_there():
    """A prefill needs each request's last logits only (SGLang prunes an extend the same way); the
    pruned forward must give exactly those rows, for the target and the drafter, with the
    hidden states of every position unchanged (the drafter reads them)."""
    t = make_target()
    d = make_drafter(t)
    ids = torch.randint(0, 97, (3, 6))
    pos = torch.arange(6).expand(3, 6)
    at = torch.tensor([5, 2, 0])
    rows = torch.arange(3)
    with torch.no_grad():
        full, cut = t(ids, pos), t(ids, pos, logits_at=at)
        dfull, dhid = d(ids, full.aux_hidden, pos)
        dcut, dhid_cut = d(ids, full.aux_hidden, pos, logits_at=at)
    assert cut.logits.shape == (3, 1, 97) and dcut.shape == (3, 1, 40)
    torch.testing.assert_close(cut.logits[:, 0], full.logits[rows, at])
    torch.testing.assert_close(cut.aux_hidden, full.aux_hidden)
    torch.testing.assert_close(dcut[:, 0], dfull[rows, at])
    torch.testing.assert_close(dhid_cut, dhid)


def test_commit_semantics():
    c = KVCache(2, 2, 1, 2, 8)
    c.lengths[:] = torch.tensor([2, 3])
    for layer in range(2):
        c.k[layer][:, 0, :, 0] = torch.arange(8.0) + 100 * layer
        c.v[layer][:, 0, :, 0] = -torch.arange(8.0)
    c.commit(torch.tensor([[5, 3, 7], [4, 6, 0]]), torch.tensor([2, 1]))
    assert c.lengths.tolist() == [4, 4]
    assert c.k[0][0, 0, :4, 0].tolist() == [0, 1, 5, 3]
    assert c.k[1][0, 0, :4, 0].tolist() == [100, 101, 105, 103]
    assert c.k[0][1, 0, :4, 0].tolist() == [0, 1, 2, 4]
    assert c.v[0][1, 0, 3, 0].item() == -4
    with pytest.raises(ValueError, match="num must be"):
        c.commit(torch.tensor([[1], [1]]), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="overflow"):
        c.check_room(torch.tensor([5, 6]), 3)


def test_router_hook_counts_and_replaces():
    t = make_target()
    ids = torch.randint(0, 97, (1, 6))
    pos = torch.arange(6)[None]
    seen = []

    def count(layer, logits, topk):
        seen.append((layer, logits.shape, topk.shape))

    def only_expert0(layer, logits, topk):
        return torch.zeros_like(topk[:, :1]), torch.ones(topk.shape[0], 1)

    with torch.no_grad():
        base = t(ids, pos, router_hook=count).logits
        forced = t(ids, pos, router_hook=only_expert0).logits
    assert [s[0] for s in seen] == list(range(5))
    assert seen[0][1] == (6, 8) and seen[0][2] == (6, 2)
    assert not torch.allclose(base, forced)


def test_bad_mask_is_rejected():
    t = make_target()
    cache = t.new_cache(1, 8)
    with pytest.raises(ValueError, match="attn_mask must be"):
        t(
            torch.zeros(1, 2, dtype=torch.long),
            torch.arange(2)[None],
            cache,
            attn_mask=torch.ones(1, 2, 3).bool(),
        )
    with pytest.raises(ValueError, match="overflow"):
        t(torch.zeros(1, 9, dtype=torch.long), torch.arange(9)[None], cache)


def test_drafter_roundtrip_and_cache(tmp_path: Path):
    t = make_target()
    d = make_drafter(t)
    assert t.aux_layer_ids == (1, 2, 3)
    d.save_pretrained(tmp_path, dtype=torch.float32)
    d2 = Eagle3Drafter.from_pretrained(tmp_path, t)
    ids = torch.randint(0, 97, (1, 7))
    pos = torch.arange(7)[None]
    with torch.no_grad():
        aux = t(ids, pos).aux_hidden
        l1, h1 = d(ids, aux, pos)
        l2, h2 = d2(ids, d2.project(aux), pos)
        torch.testing.assert_close(l1, l2)
        torch.testing.assert_close(h1, h2)
        assert l1.shape == (1, 7, 40) and h1.shape == (1, 7, 32)
        # incremental drafting with the one-layer cache equals the full drafter forward
        cache = d.new_cache(1, 16)
        d(ids[:, :4], aux[:, :4], pos[:, :4], cache)
        cache.commit(torch.arange(4)[None], torch.tensor([4]))
        l3, _ = d(ids[:, 4:], aux[:, 4:], pos[:, 4:], cache)
    torch.testing.assert_close(l3, l1[:, 4:], atol=1e-4, rtol=1e-4)
    draft_ids = torch.arange(40)
    tgt = d2.draft_to_target(draft_ids)
    assert torch.equal(d2.t2d.nonzero().flatten(), tgt)


def _sglang_names_from_source(text: str) -> tuple[dict, list]:
    """Parse legacy_name_map and stacked_params_mapping out of llama_eagle3.py's source."""
    legacy = dict(re.findall(r'"(\w+)":\s*"([\w.]+)"', text.split("legacy_name_map", 1)[1].split("}", 1)[0]))
    stacked = re.findall(
        r'\("(\.\w+)",\s*"(\.\w+)",\s*[^)]*\)', text.split("stacked_params_mapping", 1)[1].split("]", 1)[0]
    )
    return legacy, stacked


def test_checkpoint_names_match_sglang_layout(tmp_path: Path):
    """Without sglang: the saved names are exactly the list derived from llama_eagle3.py."""
    from safetensors import safe_open

    t = make_target()
    d = make_drafter(t)
    d.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("d2t").dtype == torch.int64 and f.get_tensor("t2d").dtype == torch.bool
    assert names == set(SGLANG_EAGLE3_WEIGHT_NAMES)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    for key in ("draft_vocab_size", "target_hidden_size", "hidden_size", "num_hidden_layers", "rope_theta"):
        assert key in cfg
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is False
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    mapped = {sglang_param_name(n) for n in names} - {None}
    assert "model.layers.0.self_attn.qkv_proj.weight" in mapped
    assert "model.layers.0.mlp.gate_up_proj.weight" in mapped
    assert "lm_head.weight" in mapped and "model.fc.weight" in mapped


@pytest.mark.sglang
def test_names_load_through_sglang_mapping(tmp_path: Path):
    """With sglang installed: apply the mapping in its llama_eagle3.py source to our checkpoint names,
    and check each lands on a parameter that LlamaForCausalLMEagle3 would create."""
    sglang = pytest.importorskip("sglang")
    src = Path(sglang.__file__).parent / "srt" / "models" / "llama_eagle3.py"
    text = src.read_text()
    assert "class LlamaForCausalLMEagle3" in text
    legacy, stacked = _sglang_names_from_source(text)
    assert legacy.get("midlayer") == "layers.0"
    t = make_target()
    d = make_drafter(t)
    d.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    # the parameters SGLang's modules create for a 1-layer drafter (fused qkv / gate_up, model.* prefix)
    params = {
        "model.fc.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.hidden_norm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.self_attn.qkv_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    }
    for orig in names:
        name = orig
        for old, new in legacy.items():
            name = name.replace(old, new)
        if "d2t" in name or "t2d" in name:
            continue
        for param_name, weight_name in stacked:
            if weight_name in name:
                name = name.replace(weight_name, param_name)
                break
        full = name if name in params else f"model.{name}"
        assert full in params, f"{name} would be dropped by SGLang's loader"
        assert full == sglang_param_name(orig)
    cfg = transformers.LlamaConfig(**json.loads((tmp_path / "config.json").read_text()))
    assert cfg.draft_vocab_size == 40 and cfg.num_hidden_layers == 1


SNIPPET = '''import os


def read_lines(path, encoding="utf-8"):
    """Return the lines of a text file without trailing newlines."""
    with open(path, encoding=encoding) as f:
        return [line.rstrip("\\n") for line in f]


class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, n=1):
        self.count += n
        return self.count
'''


@pytest.mark.parametrize("name", ["moe32", "moe128"])
def test_shipped_testbed_is_trained(name):
    """Each shipped pair loads from the package, is small, and is clearly trained (not random)."""
    from evict.models import load_testbed, testbed_dir

    root = testbed_dir(name)
    for sub in ("target", "drafter"):
        for f in (root / sub).glob("*.safetensors"):
            assert f.stat().st_size < 50e6, f"{f} is too large to ship"
    target, drafter, tok = load_testbed(name=name)
    assert target.aux_layer_ids == tuple(drafter.config["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
    ids = torch.tensor([tok(SNIPPET)["input_ids"]])
    assert tok.decode(ids[0]) == SNIPPET
    t = ids.shape[1]
    pos = torch.arange(t)[None]
    with torch.no_grad():
        out = target(ids, pos)
        greedy = out.logits.argmax(-1)
        target_acc = (greedy[0, :-1] == ids[0, 1:]).float().mean().item()
        # drafter step 1 (teacher-forced): row i sees hidden of position i and token i+1,
        # and should predict the target's greedy token at position i+1
        dl, _ = drafter(ids[:, 1:], out.aux_hidden[:, :-1], pos[:, :-1])
        draft = drafter.draft_to_target(dl.argmax(-1))
        agree = (draft[0] == greedy[0, 1:]).float().mean().item()
    assert target_acc > 0.2, target_acc  # random weights: ~1/4096
    assert agree > 0.45, agree
