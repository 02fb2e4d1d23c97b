"""models.py against reference implementations installed for tests only (requirements-test.txt; never run-time deps).

- timm's VisionTransformer loads our state dict strictly and computes the same features.
- Hugging Face's ViTMAEForPreTraining (a port of the official MAE that takes a `noise` argument), given our weights
  and the same noise, computes the same loss, prediction and mask.
"""
import pytest
import torch
import transformers
from timm.models import vision_transformer

import models as M
import checkpoints as B

SIZES = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def test_timm_vision_transformer_same_keys_and_features():
    ours = M.VisionTransformer(in_chans=3, **SIZES).eval()
    theirs = vision_transformer.VisionTransformer(in_chans=3, num_classes=0, global_pool='token', class_token=True,
                                                  qkv_bias=True, **SIZES).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x))
    # and back: a timm state dict is a checkpoint load_checkpoint takes as it is
    back = M.VisionTransformer(in_chans=3, **SIZES).eval()
    assert B.load_checkpoint(back, theirs.state_dict()).startswith('loaded 30 tensors')
    torch.testing.assert_close(back.forward_features(x), ours.forward_features(x), rtol=0, atol=0)


# Our block-module names -> Hugging Face's, for transformers >= 5 and for the older layout.
HF_LAYER_NAMES = {
    'new': {'norm1': 'layernorm_before', 'norm2': 'layernorm_after', 'attn.q': 'attention.q_proj',
            'attn.k': 'attention.k_proj', 'attn.v': 'attention.v_proj', 'attn.proj': 'attention.o_proj',
            'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2'},
    'old': {'norm1': 'layernorm_before', 'norm2': 'layernorm_after', 'attn.q': 'attention.attention.query',
            'attn.k': 'attention.attention.key', 'attn.v': 'attention.attention.value',
            'attn.proj': 'attention.output.dense', 'mlp.fc1': 'intermediate.dense', 'mlp.fc2': 'output.dense'},
}
HF_STACKS = {'new': ('vit.layers', 'decoder.decoder_layers'), 'old': ('vit.encoder.layer', 'decoder.decoder_layers')}
HF_TOP = {'cls_token': 'vit.embeddings.cls_token', 'pos_embed': 'vit.embeddings.position_embeddings',
          'patch_embed.proj.weight': 'vit.embeddings.patch_embeddings.projection.weight',
          'patch_embed.proj.bias': 'vit.embeddings.patch_embeddings.projection.bias',
          'norm.weight': 'vit.layernorm.weight', 'norm.bias': 'vit.layernorm.bias'}


def hf_config(transformers, in_chans, norm_pix_loss):
    return transformers.ViTMAEConfig(
        image_size=16, patch_size=4, num_channels=in_chans, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, decoder_hidden_size=16, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
        decoder_intermediate_size=64, hidden_act='gelu', layer_norm_eps=1e-6, qkv_bias=True, mask_ratio=0.75,
        norm_pix_loss=norm_pix_loss, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_hf_fixed_tables_are_ours():
    """Their sin-cos tables follow the official layout: an independent check of ours."""
    theirs = transformers.ViTMAEForPreTraining(hf_config(transformers, 1, False))
    emb = theirs.vit.embeddings
    if not emb.position_embeddings.any():  # transformers 5 marks this init done without running it
        emb.patch_embeddings.projection._is_hf_initialized = False
        emb.initialize_weights()
        theirs.decoder.initialize_weights(emb.patch_embeddings.num_patches)
    assert emb.position_embeddings.any(), 'this transformers version left the fixed tables empty'
    # float64 like theirs and the official MAE, cast to float32 at the end: bit-identical
    assert torch.equal(emb.position_embeddings.detach()[0],
                       torch.from_numpy(M.get_2d_sincos_pos_embed(32, 4, cls_token=True)))
    assert torch.equal(theirs.decoder.decoder_pos_embed.detach()[0],
                       torch.from_numpy(M.get_2d_sincos_pos_embed(16, 4, cls_token=True)))


def to_hf(sd, layout):
    """Our MAE state dict -> Hugging Face ViTMAEForPreTraining names; the fused qkv is split into q, k, v."""
    names, (enc, dec) = HF_LAYER_NAMES[layout], HF_STACKS[layout]
    out = {}
    for key, value in sd.items():
        if key in HF_TOP:
            out[HF_TOP[key]] = value
        elif M.is_decoder_key(key) and not key.startswith('decoder_blocks.'):
            out['decoder.' + key] = value
        else:
            stack, i, rest = key.split('.', 2)
            module, param = rest.rsplit('.', 1)
            prefix = f'{enc if stack == "blocks" else dec}.{i}.'
            if module == 'attn.qkv':  # rows [q | k | v]
                for part, chunk in zip(('attn.q', 'attn.k', 'attn.v'), value.chunk(3)):
                    out[prefix + names[part] + '.' + param] = chunk
            else:
                out[prefix + names[module] + '.' + param] = value
    return out


@pytest.mark.parametrize('norm_pix_loss, in_chans', [(False, 3), (True, 3), (True, 1)])
def test_hf_vit_mae_same_loss(norm_pix_loss, in_chans):
    decoder = dict(decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2)
    ours = M.MaskedAutoencoder(in_chans=in_chans, norm_pix_loss=norm_pix_loss, **SIZES, **decoder).eval()
    theirs = transformers.ViTMAEForPreTraining(hf_config(transformers, in_chans, norm_pix_loss)).eval()
    layout = 'new' if 'vit.layers.0.attention.q_proj.weight' in theirs.state_dict() else 'old'
    theirs.load_state_dict(to_hf(ours.state_dict(), layout), strict=True)
    imgs, noise = torch.randn(3, in_chans, 16, 16), torch.rand(3, 16)
    with torch.no_grad():
        loss, pred, mask = ours(imgs, mask_ratio=0.75, noise=noise)
        out = theirs(pixel_values=imgs, noise=noise)
    torch.testing.assert_close(mask, out.mask)
    torch.testing.assert_close(pred, out.logits)
    torch.testing.assert_close(loss, out.loss)  # float32 tolerances
