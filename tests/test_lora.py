"""The target parameters: exact properties of LoRA, adapters, freezing and the target filter."""
import copy
import io
import math

import pytest
import torch
import torch.nn as nn

import lora
import models

D, DEPTH = 32, 2
N_PROMPT, L = 3, 16                                                              # prompt tokens, patches of 32/8


def peft(r=4, alpha=8, layers=('qkv',), qv_only=False, adapter='none', dim=8, scale=0.5, prompt=0, deep=False):
    return {'lora': {'r': r, 'alpha': alpha, 'dropout': 0.0, 'layers': list(layers), 'qv_only': qv_only},
            'adapter': {'kind': adapter, 'dim': dim, 'scale': scale}, 'prompt': {'tokens': prompt, 'deep': deep}}


def vit(seed=0, mae=False):
    torch.manual_seed(seed)
    kw = dict(img_size=32, patch_size=8, in_chans=1, embed_dim=D, depth=DEPTH, num_heads=2)
    if mae:
        return models.MaskedAutoencoder(**kw, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    return models.VisionTransformer(**kw)


def images(n=3, seed=1):
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps=3, lr=0.05):
    """A few AdamW steps on the trainable parameters, so the targets move away from their init."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    x = images()
    for _ in range(steps):
        model.forward_features(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


CONFIGS = {
    'lora-qkv': peft(),
    'lora-all': peft(layers=('qkv', 'proj', 'fc1', 'fc2')),
    'lora-qv': peft(qv_only=True),
    'adapter-parallel': peft(r=0, adapter='parallel'),
    'adapter-sequential': peft(r=0, adapter='sequential'),
    'both': peft(adapter='sequential'),
}


@pytest.mark.parametrize('name', CONFIGS)
def test_injected_model_starts_equal_to_backbone(name):
    base = vit()
    model = copy.deepcopy(base)
    assert lora.inject(model, CONFIGS[name]) > 0
    x = images()
    assert torch.equal(model.forward_features(x), base.forward_features(x))   # B = 0 / up = 0: exactly the backbone


def test_names_kept_and_targets_added():
    model = vit()
    before = set(model.state_dict())
    lora.inject(model, peft(layers=('qkv', 'fc2')))
    added = set(model.state_dict()) - before
    assert before <= set(model.state_dict())          # blocks.N.attn.qkv.weight keeps its name
    assert added == {f'blocks.{i}.{layer}.lora.{ab}' for i in range(DEPTH) for layer in ('attn.qkv', 'mlp.fc2')
                     for ab in 'AB'}


def test_merge_matches_unmerged_and_unmerge_restores():
    model = vit()
    lora.inject(model, peft(layers=('qkv', 'proj', 'fc1', 'fc2'), qv_only=True))
    lora.mark_trainable(model)
    train_steps(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x = images()
    with torch.no_grad():
        out = model.forward_features(x)
        lora.merge(model)
        merged = model.forward_features(x)
        assert not torch.equal(model.blocks[0].attn.qkv.weight, weights['blocks.0.attn.qkv.weight'])
        lora.unmerge(model)
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize('qv_only', [False, True])
def test_lora_runs_under_bf16_autocast(qv_only):
    """Both LoRA layouts (one pair, and q/v slices of the fused qkv) under CPU autocast, as run.amp=bf16 trains."""
    model = vit()
    lora.inject(model, peft(qv_only=qv_only))
    lora.mark_trainable(model)
    train_steps(model)                                                 # B != 0: the update is in the output
    x = images()
    with torch.no_grad():
        ref = model.forward_features(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model.forward_features(x)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize('prompts', [0, N_PROMPT])
def test_merged_export_is_a_plain_vit_with_its_prompts(prompts):
    model = vit()
    lora.inject(model, peft(layers=('qkv', 'fc2'), qv_only=True, prompt=prompts, deep=True))
    lora.mark_trainable(model)
    train_steps(model)
    x = images()
    with torch.no_grad():
        out = model.forward_features(x)
        sd = lora.merged_state_dict(model)
    plain = vit()
    if prompts:                                                          # prompts stay: a ViT with the slot filled
        lora.inject(plain, peft(r=0, prompt=prompts, deep=True))
    assert sd.keys() == plain.state_dict().keys()                    # no LoRA factor left, every ViT key there
    plain.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(x), out, atol=1e-5, rtol=0)


def test_qv_only_leaves_k_untouched():
    model = vit()
    lora.inject(model, peft(qv_only=True))
    lora.mark_trainable(model)
    train_steps(model)
    layer = model.blocks[0].attn.qkv
    dW = layer.lora.delta_weight()                                            # (3D, D)
    assert dW[:D].abs().sum() > 0 and dW[2 * D:].abs().sum() > 0
    assert torch.equal(dW[D:2 * D], torch.zeros(D, D))
    x = torch.randn(4, 5, D)
    with torch.no_grad():
        delta = layer(x) - nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(delta[..., D:2 * D], torch.zeros(4, 5, D))
    assert layer.lora.A.shape == (2 * 4, D) and layer.lora.B.shape == (2 * D, 4)   # one rank-r pair for q, one for v


@pytest.mark.parametrize('kind', ['parallel', 'sequential'])
def test_adapters_read_what_their_papers_read(kind):
    """AdaptFormer: x + mlp(norm2(x)) + s * up(relu(down(x))) on the residual stream x, before norm2; Houlsby: each
    branch output y becomes y + s * up(relu(down(y))). Zero up and zero down bias (AdaptFormer's init)."""
    model = vit()
    lora.inject(model, peft(r=0, adapter=kind, dim=8, scale=0.5))
    blk, ad = model.blocks[0], model.blocks[0].adapter_mlp
    assert not ad.up.weight.any() and not ad.up.bias.any() and not ad.down.bias.any() and ad.down.weight.any()
    for m in (blk.adapter_attn, ad):
        if m is not None:
            nn.init.normal_(m.up.weight)
    x = torch.randn(2, 5, D)

    def bottleneck(m, v):
        return 0.5 * m.up(torch.relu(m.down(v)))
    with torch.no_grad():
        if kind == 'parallel':
            x1 = x + blk.attn(blk.norm1(x))
            expected = x1 + blk.mlp(blk.norm2(x1)) + bottleneck(ad, x1)
        else:
            y = blk.attn(blk.norm1(x))
            x1 = x + y + bottleneck(blk.adapter_attn, y)
            y = blk.mlp(blk.norm2(x1))
            expected = x1 + y + bottleneck(ad, y)
        torch.testing.assert_close(blk(x), expected, atol=1e-6, rtol=0)


def test_inject_only_into_encoder_and_bad_pattern_lists_layers():
    mae = vit(mae=True)
    lora.inject(mae, peft(layers=('qkv', 'fc1'), adapter='sequential'))
    targets = [n for n, _ in lora.target_parameters(mae)]
    assert targets and all(n.startswith('blocks.') for n in targets)
    assert not any(isinstance(m, (lora.LoRALinear, lora.Adapter)) for m in mae.decoder_blocks.modules())
    with pytest.raises(ValueError, match=r"peft.lora.layers: 'qkvv' matches no linear.*attn.qkv.*mlp.fc1"):
        lora.inject(vit(), peft(layers=('qkvv',)))


def test_freezing_keeps_backbone_bit_identical():
    mae = vit(mae=True)
    lora.inject(mae, peft(layers=('qkv', 'fc1'), adapter='parallel'))
    backbone = {n: p.detach().clone() for n, p in mae.named_parameters()}
    head = nn.Linear(D, 3)
    counts = lora.mark_trainable(mae, extra=head.parameters())
    trainable = {n for n, p in mae.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora.target_parameters(mae)}
    assert all(p.requires_grad for p in head.parameters())
    assert counts['targets'] == counts['trainable'] > 0
    params = [p for p in mae.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    for _ in range(2):
        loss, _, _ = mae(images(), 0.75)
        (loss + head(mae.forward_features(images())[:, 0]).sum()).backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(p, backbone[n]) for n, p in mae.named_parameters() if n in trainable)
    for n, p in mae.named_parameters():
        if n not in trainable:
            assert torch.equal(p, backbone[n]), n                                # bit-identical


def test_filter_is_exact_counts_and_round_trips():
    r = 4
    model = vit()
    lora.inject(model, peft(r=r))
    sd = lora.target_state_dict(model)
    assert set(sd) == {f'blocks.{i}.attn.qkv.lora.{ab}' for i in range(DEPTH) for ab in 'AB'}
    assert sum(v.numel() for v in sd.values()) == DEPTH * r * (D + 3 * D)      # the LoRA formula for qkv
    lora.mark_trainable(model)
    train_steps(model)
    sd = lora.target_state_dict(model)
    other = vit()                                                              # same backbone, fresh targets
    lora.inject(other, peft(r=r))
    lora.mark_trainable(other)
    x = images()
    assert not torch.equal(other.forward_features(x), model.forward_features(x))
    lora.load_target_state_dict(other, sd)
    assert torch.equal(other.forward_features(x), model.forward_features(x))
    assert all(p.requires_grad for _, p in lora.target_parameters(other))      # stage 2 fine-tunes them


def test_filter_ignores_bias_names_and_heads():
    model = models.TaskModel(vit(), nn.Linear(D, 2))
    lora.inject(model.backbone, peft(adapter='parallel'))
    names = {n for n, _ in lora.target_parameters(model)}
    assert not any(n.startswith('head') for n in names)
    assert 'backbone.blocks.0.attn.qkv.bias' not in names
    assert 'backbone.blocks.0.adapter_mlp.up.bias' in names                    # by owning module, not by name


def _targets(cfg, seed=0):
    model = vit(seed)
    lora.inject(model, cfg)
    return model


@pytest.mark.parametrize('saved, wanted, message', [
    (peft(r=8), peft(r=4), r'saved with rank 8, config has rank 4'),
    (peft(), peft(layers=('qkv', 'proj')), r'missing .*attn.proj.lora.A.*peft.lora.layers'),
    (peft(layers=('qkv', 'fc1')), peft(), r'unexpected .*mlp.fc1.lora'),
    (peft(r=0, adapter='parallel', dim=8), peft(r=0, adapter='parallel', dim=4), r'adapter dim 8, config has 4'),
    (peft(r=0, adapter='sequential'), peft(r=0, adapter='parallel'), r'unexpected .*adapter_attn'),
    (peft(prompt=4), peft(prompt=8), r'saved 4 prompt tokens in 1 block\(s\), config has 8 in 1 \(peft.prompt'),
    (peft(prompt=4), peft(prompt=4, deep=True), r'in 1 block\(s\), config has 4 in 2 \(peft.prompt'),
    (peft(prompt=4), peft(), r'\(lora on attn.qkv x2, prompt x1\) .*unexpected \[.prompt.tokens.\]'),
])
def test_mismatches_raise_named_errors(saved, wanted, message):
    sd = lora.target_state_dict(_targets(saved))
    with pytest.raises(lora.TargetMismatchError, match=message):
        lora.load_target_state_dict(_targets(wanted), sd)


def _expected(settings, seed=0):
    """A model with these targets inserted, and the metadata a targets file for it must have."""
    model = _targets(settings, seed)
    return model, {'arch': {'embed_dim': D}, 'peft': lora.structure(model),
                   'backbone': lora.backbone_fingerprint(model)}


def _targets_file(path, settings, seed=0):
    model, meta = _expected(settings, seed)
    with torch.no_grad():
        for _, p in lora.target_parameters(model):
            p.add_(1.0)                                                          # trained: not the fresh init
    torch.save({'targets': lora.target_state_dict(model), 'meta': meta}, path)
    return meta


def test_targets_file_meta_is_checked(tmp_path):
    path = tmp_path / 'targets.pth'
    meta = _targets_file(path, peft())
    lora.load_targets(path, *_expected(peft()))                                 # same everything: loads
    with pytest.raises(lora.TargetMismatchError, match='backbone.checkpoint'):
        lora.load_targets(path, *_expected(peft(), seed=1))
    with pytest.raises(lora.TargetMismatchError, match=r'model\.\*'):
        lora.load_targets(path, _targets(peft()), dict(meta, arch={'embed_dim': 64}))
    with pytest.raises(lora.TargetMismatchError, match=r'scaling 2.0, this run has 4.0 \(peft.lora.alpha'):
        lora.load_targets(path, *_expected(peft(alpha=16)))
    with pytest.raises(lora.TargetMismatchError, match=r'rank 4, config has rank 2 \(peft.lora.r\)'):
        lora.load_targets(path, *_expected(peft(r=2, alpha=4)))


@pytest.mark.parametrize('saved, wanted', [
    (peft(layers=['qkv']), peft(layers=['attn.qkv'])),                          # the same layers, named two ways
    (peft(r=0, alpha=8, adapter='parallel'), peft(r=0, alpha=32, adapter='parallel')),   # no LoRA: alpha unused
    (peft(r=4, alpha=8), peft(r=4, alpha=8.0)),
])
def test_equivalent_settings_load_the_targets(tmp_path, saved, wanted):
    path = tmp_path / 'targets.pth'
    _targets_file(path, saved)
    model, expected = _expected(wanted)
    lora.load_targets(path, model, expected)
    saved_targets = torch.load(path)['targets']
    assert all(torch.equal(p, saved_targets[n]) for n, p in lora.target_parameters(model))


@pytest.mark.parametrize('damage, message', [
    (lambda path: path.write_bytes(b''), 'not a readable targets file'),
    (lambda path: path.write_bytes(path.read_bytes()[:200]), 'not a readable targets file'),
    (lambda path: path.write_text('r: 4\n'), 'not a readable targets file'),
    (lambda path: torch.save({'targets': torch.load(path)['targets']}, path), 'no meta'),
    (lambda path: torch.save({k: {n: v * math.nan for n, v in d.items()} if k == 'targets' else d
                              for k, d in torch.load(path).items()}, path), 'NaN or Inf'),
])
def test_damaged_targets_file_is_named(tmp_path, damage, message):
    path = tmp_path / 'targets.pth'
    _targets_file(path, peft())
    damage(path)
    with pytest.raises(lora.TargetMismatchError, match=rf'{path}: .*{message}'):
        lora.load_targets(path, *_expected(peft()))


def test_fingerprint_ignores_targets_and_decoder():
    mae = vit(mae=True)
    before = lora.backbone_fingerprint(mae)
    lora.inject(mae, peft(adapter='parallel'))
    with torch.no_grad():
        mae.decoder_pred.weight.add_(1)
        next(p for _, p in lora.target_parameters(mae)).add_(1)
    assert lora.backbone_fingerprint(mae) == before
    with torch.no_grad():
        mae.blocks[0].norm1.weight.add_(1)
    assert lora.backbone_fingerprint(mae) != before


def test_vit_base_targets_file_under_one_percent_of_backbone():
    model = models.VisionTransformer(**models.vit_kwargs({'preset': 'vit_base', 'img_size': 224, 'patch_size': 16,
                                                          'in_chans': 3, 'embed_dim': None, 'depth': None,
                                                          'num_heads': None, 'mlp_ratio': None}))
    backbone_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    lora.inject(model, peft(r=8, alpha=8))
    buf = io.BytesIO()
    torch.save({'targets': lora.target_state_dict(model), 'meta': {}}, buf)
    assert buf.tell() < 0.01 * backbone_bytes, (buf.tell(), backbone_bytes)


# ----------------------------------------------------------------------------------------------------------------------
# Visual prompt tuning: learned tokens after cls, the only new keys, seen by the encoder blocks only


def block_inputs(model):
    """Record the tokens entering each encoder block (forward pre-hooks); returns the list they are appended to."""
    seen = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize('deep', [False, True])
def test_prompts_are_the_only_new_keys_with_vpt_shapes(deep):
    model = vit()
    before = set(model.state_dict())
    assert lora.inject(model, peft(r=0, prompt=N_PROMPT, deep=deep)) == 1
    assert set(model.state_dict()) - before == {'prompt.tokens'} and before <= set(model.state_dict())
    tokens = model.prompt.tokens
    assert tokens.shape == (DEPTH if deep else 1, N_PROMPT, D)                 # one set per block (deep) or one
    bound = (6 / (1 * 8 * 8 + D)) ** 0.5                                        # VPT: xavier bound of the patch proj
    assert 0.5 * bound < tokens.abs().max() <= bound
    assert set(lora.target_state_dict(model)) == {'prompt.tokens'}
    assert lora.structure(model) == {'prompt': None}                           # the shape is the whole structure


@pytest.mark.parametrize('cfg', [peft(r=0, prompt=N_PROMPT), peft(prompt=N_PROMPT, deep=True, adapter='parallel')])
def test_prompts_change_outputs_only_through_them(cfg):
    base = vit()
    model = copy.deepcopy(base)
    lora.inject(model, cfg)
    x = images()
    out, plain = model.forward_features(x), base.forward_features(x)
    assert out.shape == plain.shape == (3, 1 + L, D)                           # prompts never leave the encoder
    assert not torch.allclose(out[:, 0], plain[:, 0]) and not torch.allclose(out[:, 1:], plain[:, 1:])
    prompt, model.prompt = model.prompt, None
    assert torch.equal(model.forward_features(x), plain)                       # LoRA B = 0, adapter up = 0
    model.prompt = prompt
    lora.mark_trainable(model)
    model.forward_features(x).pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert 'prompt.tokens' in grads and grads <= {n for n, _ in lora.target_parameters(model)}
    assert (model.prompt.tokens.grad.flatten(1).abs().sum(1) > 0).all()      # every block's prompts matter


def test_deep_prompts_are_replaced_in_every_block_shallow_ones_travel():
    for deep in (False, True):
        model = vit()
        lora.inject(model, peft(r=0, prompt=N_PROMPT, deep=deep))
        seen = block_inputs(model)
        model.forward_features(images())
        assert [s.shape for s in seen] == [(3, 1 + N_PROMPT + L, D)] * DEPTH   # replaced, not appended
        for i, s in enumerate(seen):
            inserted = torch.equal(s[:, 1:1 + N_PROMPT], model.prompt.tokens[i if deep else 0].expand(3, -1, -1))
            assert inserted == (deep or i == 0), (deep, i)                    # shallow: block 0's output travels on


def test_segmentation_and_mean_pool_see_patch_tokens_only():
    model = vit()
    lora.inject(model, peft(r=0, prompt=N_PROMPT, deep=True))
    outputs = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda mod, args, out: outputs.append(out.detach()))
    x = images()
    features = model.get_intermediate_layers(x, [1, 0])
    assert [f.shape for f in features] == [(3, L, D)] * 2
    assert torch.equal(features[0], outputs[1][:, 1 + N_PROMPT:])             # block 1's patch tokens, in order
    assert torch.equal(features[1], outputs[0][:, 1 + N_PROMPT:])
    tokens = model.forward_features(x)
    assert torch.equal(tokens, model.norm(torch.cat([outputs[-1][:, :1], outputs[-1][:, 1 + N_PROMPT:]], 1)))
    head = models.ClassificationHead(D, 2, pool='mean')
    patches = model.norm(outputs[-1][:, 1 + N_PROMPT:])                       # (B, L, D), no prompt token
    assert torch.equal(head(tokens), head.head(head.fc_norm(patches.mean(1))))
    seg = models.SegmentationHead(D, 8, 1, num_classes=3, depth=4, channels=(8, 4, 4))
    deeper = models.VisionTransformer(img_size=32, patch_size=8, in_chans=1, embed_dim=D, depth=4, num_heads=2)
    lora.inject(deeper, peft(r=0, prompt=N_PROMPT))
    assert models.TaskModel(deeper, seg)(x).shape == (3, 3, 32, 32)


def test_mae_prompts_join_the_visible_tokens_only():
    mae = vit(mae=True)
    lora.inject(mae, peft(r=0, prompt=N_PROMPT))
    seen = block_inputs(mae)
    decoder_seen = []
    mae.decoder_embed.register_forward_pre_hook(lambda mod, args: decoder_seen.append(args[0].shape))
    lora.mark_trainable(mae)
    loss, pred, mask = mae(images(), mask_ratio=0.75)
    keep = L // 4
    assert [s.shape for s in seen] == [(3, 1 + N_PROMPT + keep, D)] * DEPTH   # cls + prompts + visible patches
    assert decoder_seen == [(3, 1 + keep, D)]                                  # the decoder never sees the prompts
    assert pred.shape == (3, L, 64) and torch.isfinite(loss)
    loss.backward()
    assert mae.prompt.tokens.grad.abs().sum() > 0


def test_a_targets_file_without_the_resolved_structure_is_named_as_older():
    with pytest.raises(lora.TargetMismatchError, match=r'no record of blocks\.0\.attn\.qkv\.lora, this run has'):
        lora.check_meta({'peft': {'lora': {'r': 8}}}, {'peft': {'blocks.0.attn.qkv.lora': 1.0}}, 'old.pth', ('peft',))


# ------------------------------------------------------------------------------- how far fine-tuning moved LoRA

def test_update_survival_is_1_for_the_saved_update_and_minus_1_for_its_negation():
    model = vit()
    lora.inject(model, peft(layers=('qkv', 'fc1'), qv_only=True))
    lora.mark_trainable(model)
    train_steps(model)                                         # B != 0
    saved = lora.target_state_dict(model)
    same = lora.update_survival(saved, model)
    layers = {f'blocks.{i}.{n}' for i in range(DEPTH) for n in ('attn.qkv', 'mlp.fc1')}
    assert same['per_layer'].keys() == layers
    assert all(v == pytest.approx({'cosine': 1.0, 'norm_ratio': 1.0}) for v in same['per_layer'].values())
    assert same['cosine'] == pytest.approx(1.0) and same['norm_ratio'] == pytest.approx(1.0)
    negated = {k: -v if k.endswith('.B') else v for k, v in saved.items()}
    half = {k: v / 2 if k.endswith('.B') else v for k, v in saved.items()}
    assert lora.update_survival(negated, model)['cosine'] == pytest.approx(-1.0)
    halved = lora.update_survival(half, model)                 # stage 1 half as large: the final is twice
    assert halved['cosine'] == pytest.approx(1.0) and halved['norm_ratio'] == pytest.approx(2.0)


@pytest.mark.parametrize('qv_only', [False, True])
def test_update_ratio_matches_a_hand_computation_on_a_tiny_layer(qv_only):
    torch.manual_seed(0)
    base = nn.Linear(4, 6)                                     # a fused qkv of width 2
    layer = lora.LoRALinear(base, r=1, alpha=2, slices=[(0, 2), (4, 6)] if qv_only else None)
    with torch.no_grad():
        layer.lora.B.normal_()
    A, B, W = layer.lora.A, layer.lora.B, base.weight
    if qv_only:                                                # q and v: each slice its own pair, W's rows 0-1, 4-5
        dW = torch.cat([B[:2] @ A[:1], B[2:] @ A[1:]]) * 2.0
        W = torch.cat([W[:2], W[4:]])
    else:
        dW = B @ A * 2.0
    model = nn.Sequential(layer)
    expected = (dW.norm() / W.norm()).item()
    ratio = lora.update_ratio(model)
    assert ratio['per_layer'] == pytest.approx({'0': expected}) and ratio['median'] == pytest.approx(expected)
    layer.merge()                                              # merged: W is still the base weight
    assert lora.update_ratio(model)['median'] == pytest.approx(expected)
