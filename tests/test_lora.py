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


def peft(r=4, alpha=8, layers=('qkv',), qv_only=False, adapter='none', dim=8, scale=0.5):
    return {'lora': {'r': r, 'alpha': alpha, 'dropout': 0.0, 'layers': list(layers), 'qv_only': qv_only},
            'adapter': {'kind': adapter, 'dim': dim, 'scale': scale}}


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


def test_merged_export_is_a_plain_vit():
    model = vit()
    lora.inject(model, peft(layers=('qkv', 'fc2'), qv_only=True))
    lora.mark_trainable(model)
    train_steps(model)
    x = images()
    with torch.no_grad():
        out = model.forward_features(x)
        sd = lora.merged_state_dict(model)
    plain = vit()
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
