"""The whole model of tpp in one file.

- `VisionTransformer`: a plain-PyTorch ViT whose parameter names and shapes are those of timm's `VisionTransformer`
  and of the official MAE encoder, so their checkpoints load as they are. No head.
- `MaskedAutoencoder`: the same encoder plus the official MAE decoder, masking and loss; `DINOHead`: DINO's head.
- `ClassificationHead`, `SegmentationHead` (UNETR-style, convolutions only) and `TaskModel` (backbone + head).
- Builders from the config's `model:`, `mae:` and `finetune:` sections (real checkpoints load through
  checkpoints.load_checkpoint).

Shapes: B batch, C image channels, H = W image side, p patch side, g = H / p patches per side, L = g * g patches,
D embedding width, K classes.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ConfigError


# --------------------------------------------------------------------------------------------------------------------
# Fixed 2D sin-cos position embedding (the official MAE table)

def _sincos_1d(dim, pos):
    """pos: (M,) float64 positions -> (M, dim) float64: sines of dim/2 frequencies, then their cosines."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))  # (dim/2,)
    angles = np.outer(pos, omega)  # (M, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """(grid_size**2 [+1], embed_dim) table for patches in raster order, as the official MAE lays it out.

    The first half of the channels encodes the column, the second half the row; with cls_token a zero row comes
    first. Computed in float64 like the official code and cast to float32 at the end, as its copy into the float32
    parameter does, so a fresh table is bit-identical to a checkpoint's.
    """
    if embed_dim % 4:
        raise ValueError(f'the 2D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}')
    rows, cols = np.divmod(np.arange(grid_size * grid_size, dtype=np.float64), grid_size)  # raster order
    table = np.concatenate([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return table.astype(np.float32)


def resize_pos_grid(pos, grid_size):
    """pos: (1, G*G, D) patch rows of a position table -> (1, g*g, D) for a g x g patch grid: bicubic on the grid, as
    MAE's fine-tuning adapts a checkpoint and DINO embeds its smaller local crops."""
    G = math.isqrt(pos.shape[1])
    grid = pos.float().reshape(1, G, G, -1).permute(0, 3, 1, 2)  # (1, D, G, G)
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode='bicubic', align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, -1)


def _fixed_sincos_(param, grid_size):
    """Fill a (1, 1+L, D) parameter with the sin-cos table (cls row zero)."""
    table = get_2d_sincos_pos_embed(param.shape[-1], grid_size, cls_token=True)
    with torch.no_grad():
        param.copy_(torch.from_numpy(table).unsqueeze(0))


def _init_linear_and_norm(m):
    """Official MAE init: xavier-uniform linears (as the JAX ViT), zero biases, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------------------------
# Transformer parts (timm names: patch_embed.proj, attn.qkv, attn.proj, mlp.fc1, mlp.fc2, norm1, norm2)

class PatchEmbed(nn.Module):
    """Square image -> sequence of patch embeddings by a conv with kernel = stride = patch size."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f'img_size {img_size} is not a multiple of patch_size {patch_size}')
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size  # patches per side (square images only, as MAE)
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        """x: (B, C, H, W) -> (B, L, D), patches in raster order. H = W = img_size, or another square side that is
        a multiple of the patch size (DINO's local crops)."""
        H, W = x.shape[-2:]
        if H != W or H % self.patch_size:
            raise ValueError(f'expected square images with a side divisible by {self.patch_size} (the model\'s: '
                             f'{self.img_size}), got {H}x{W}')
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, through scaled_dot_product_attention."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embedding width {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        """x: (B, N, D) -> (B, N, D)."""
        B, N, D = x.shape
        # qkv output channels are [q | k | v], each split into heads of D / num_heads (the timm/MAE layout).
        # Layers are called as modules, never through their .weight, so lora.py can replace them.
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # one unbind, not three qkv[i]: its backward is one stack, not 3 zero-filled copies
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D / heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with two PEFT slots that lora.inject may fill (None for the plain backbone)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adapter_attn = None  # adapter(x, y) -> y': sees the residual stream x (pre-norm), branch output y
        self.adapter_mlp = None

    def forward(self, x):
        """x: (B, N, D) -> (B, N, D)."""
        y = self.attn(self.norm1(x))
        if self.adapter_attn is not None:
            y = self.adapter_attn(x, y)
        x = x + y
        y = self.mlp(self.norm2(x))
        if self.adapter_mlp is not None:
            y = self.adapter_mlp(x, y)
        return x + y


# --------------------------------------------------------------------------------------------------------------------
# The backbone

class VisionTransformer(nn.Module):
    """ViT encoder with the exact parameter names of timm and the official MAE; no head (see ClassificationHead).

    `arch` holds the constructor kwargs (also on a MaskedAutoencoder, so both stages describe the same backbone).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0):
        super().__init__()
        self.arch = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, mlp_ratio=mlp_ratio,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads)   # in vit_kwargs' order
        self.embed_dim, self.depth = embed_dim, depth
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos table as in MAE pre-training; a Parameter (not a buffer) so it is in the state dict like the
        # official one, and requires_grad=False so it stays fixed.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.prompt = None  # PEFT prompt tokens (lora.Prompt) that lora.inject may insert; see _run_blocks
        self._init_encoder()

    def _init_encoder(self):
        _fixed_sincos_(self.pos_embed, self.patch_embed.grid_size)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # MAE treats the patch projection as a linear layer
        nn.init.normal_(self.cls_token, std=0.02)
        for m in (self.blocks, self.norm):
            m.apply(_init_linear_and_norm)

    def embed_patches(self, x):
        """x: (B, C, H, W) -> (B, L, D) patch embeddings plus their position embeddings. Images of another side than
        img_size (DINO's local crops) get the position table resized to their patch grid, as DINO does."""
        x, pos = self.patch_embed(x), self.pos_embed[:, 1:]                  # (B, L, D), (1, G*G, D)
        if x.shape[1] != pos.shape[1]:
            pos = resize_pos_grid(pos, math.isqrt(x.shape[1])).to(pos.dtype)
        return x + pos

    def prepend_cls(self, x):
        """x: (B, N, D) -> (B, 1+N, D) with the cls token (plus its position embedding) in front."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def _run_blocks(self, x, block_ids):
        """x: (B, 1+L, D) -> [(B, 1+L, D)]: the output of each block in block_ids, in the order given; blocks after
        the last one asked for are not run. Prompt tokens (VPT), when the `prompt` slot is filled, enter after cls
        before the first block (or anew before every block, when deep) and are dropped from every output."""
        outputs, n = {}, 0
        for i, blk in enumerate(self.blocks[:max(block_ids) + 1]):
            if self.prompt is not None:
                x, n = self.prompt(x, i), self.prompt.tokens.shape[1]  # (B, 1+N+L, D)
            x = blk(x)
            if i in block_ids:
                outputs[i] = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1) if n else x
        return [outputs[i] for i in block_ids]

    def forward_features(self, x):
        """x: (B, C, H, W) -> all tokens after the final norm, (B, 1+L, D); token 0 is cls."""
        return self.norm(self._run_blocks(self.prepend_cls(self.embed_patches(x)), [self.depth - 1])[0])

    def forward(self, x):
        return self.forward_features(x)

    def get_intermediate_layers(self, x, block_ids):
        """x: (B, C, H, W) -> [(B, L, D)]: the patch tokens (no cls, no final norm) output by each block in
        block_ids, in the order given. Blocks after the last one asked for are not run."""
        if not all(0 <= i < self.depth for i in block_ids):
            raise ValueError(f'block ids {list(block_ids)} out of range for depth {self.depth}')
        return [f[:, 1:] for f in self._run_blocks(self.prepend_cls(self.embed_patches(x)), block_ids)]


# --------------------------------------------------------------------------------------------------------------------
# The pretext models: MAE, and DINO's head (its teacher and loss: pretrain_targets.SelfDistillation)

def is_decoder_key(name):
    """True for the MAE decoder's state-dict names (everything the plain encoder lacks)."""
    return name.startswith(('decoder_', 'mask_token'))


class MaskedAutoencoder(VisionTransformer):
    """MAE: the encoder above (its keys stay top-level, as in the official checkpoint) plus the official decoder.

    forward(imgs, mask_ratio, noise) -> (loss, pred, mask) like the official `MaskedAutoencoderViT`; given the same
    weights and noise it computes the same loss. The encoder sees the visible tokens only.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, norm_pix_loss=False):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio)
        self.decoder_arch = dict(decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                                 decoder_num_heads=decoder_num_heads, norm_pix_loss=norm_pix_loss)
        self.norm_pix_loss = norm_pix_loss
        num_patches = self.patch_embed.num_patches
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, decoder_embed_dim),
                                              requires_grad=False)  # fixed sin-cos, like pos_embed
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)  # decoder to pixels of a patch
        self._init_decoder()

    def _init_decoder(self):
        _fixed_sincos_(self.decoder_pos_embed, self.patch_embed.grid_size)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(_init_linear_and_norm)

    def patchify(self, imgs):
        """imgs: (B, C, H, W) -> (B, L, p*p*C). Patches in raster order; inside a patch: row, column, channel
        (channel fastest), the official layout generalised to any channel count."""
        B, C, H, W = imgs.shape
        p = self.patch_embed.patch_size
        if H != W or H % p:
            raise ValueError(f'patchify needs square images with a side divisible by {p}, got {H}x{W}')
        x = imgs.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x):
        """x: (B, L, p*p*C) -> imgs (B, C, H, W); the inverse of patchify."""
        B, L, _ = x.shape
        p, g, C = self.patch_embed.patch_size, math.isqrt(L), self.arch['in_chans']
        if g * g != L or x.shape[2] != p * p * C:
            raise ValueError(f'unpatchify expects (B, square L, {p * p * C}), got {tuple(x.shape)}')
        x = x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(B, C, g * p, g * p)

    def random_masking(self, x, mask_ratio, noise=None):
        """Per-sample random masking: keep the int(L * (1 - mask_ratio)) tokens of smallest noise.

        x: (B, L, D), noise: (B, L) or None (uniform) -> x_visible (B, L_keep, D), mask (B, L) float with
        0 = keep, 1 = remove, ids_restore (B, L): the rank of each patch in the shuffle (inverts it).
        """
        B, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        elif noise.shape != (B, L):
            raise ValueError(f'noise must have shape {(B, L)}, got {tuple(noise.shape)}')
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]  # (B, L_keep)
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = (ids_restore >= len_keep).float()  # 0 is keep, 1 is remove
        return x_visible, mask, ids_restore

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """imgs: (B, C, H, W) -> latent (B, 1+L_keep, D), mask (B, L), ids_restore (B, L).
        Only the visible tokens (and prompt tokens, if any) go through the blocks: MAE's speed-up."""
        x = self.embed_patches(imgs)  # (B, L, D)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        x = self._run_blocks(self.prepend_cls(x), [self.depth - 1])[0]  # (B, 1+L_keep, D)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        """latent: (B, 1+L_keep, D), ids_restore: (B, L) -> pred (B, L, p*p*C) for every patch."""
        x = self.decoder_embed(latent)  # (B, 1+L_keep, Dd)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)  # one per removed patch
        x_ = torch.cat([x[:, 1:], mask_tokens.to(x.dtype)], dim=1)  # (B, L, Dd) in shuffled order, no cls
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # back to raster order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1+L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop cls

    @staticmethod
    def patch_stats(patches):
        """patches: (B, L, p*p*C) -> mean, std (B, L, 1) of each patch, the statistics of norm_pix_loss: unbiased
        variance, as the official code, written out as a sum (a plain reduction, faster than Tensor.var on CPU)."""
        mean = patches.mean(dim=-1, keepdim=True)
        var = (patches - mean).square().sum(dim=-1, keepdim=True) / (patches.shape[-1] - 1)
        return mean, (var + 1e-6) ** 0.5

    def pixels(self, pred, imgs):
        """pred: (B, L, p*p*C) -> the predicted pixels of each patch: with norm_pix_loss the decoder predicts
        normalised patches, mapped back with the statistics of the same patches of imgs (B, C, H, W)."""
        if not self.norm_pix_loss:
            return pred
        mean, std = self.patch_stats(self.patchify(imgs))
        return pred * std + mean

    def forward_loss(self, imgs, pred, mask):
        """imgs: (B, C, H, W), pred: (B, L, p*p*C), mask: (B, L) -> mean squared error over removed patches.
        Computed in float32 so bf16/fp16 autocast runs stay accurate."""
        target = self.patchify(imgs.float())
        if self.norm_pix_loss:  # per-patch normalised pixels
            mean, std = self.patch_stats(target)
            target = (target - mean) / std
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L) per patch
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """imgs: (B, C, H, W) -> loss, pred (B, L, p*p*C), mask (B, L) with 1 = removed."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


# --------------------------------------------------------------------------------------------------------------------
# Task heads (always trainable) and the stage-2 model

class ClassificationHead(nn.Module):
    """Linear classifier on the cls token ('cls') or on the mean patch token after fc_norm ('mean').

    'mean' follows MAE's fine-tuning model, with one difference: MAE drops the encoder's final norm when it pools,
    here the tokens come after it (forward_features) and fc_norm re-normalises their mean.
    """

    def __init__(self, embed_dim, num_classes, pool='cls'):
        super().__init__()
        self.pool = pool
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if pool == 'mean' else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # small, as MAE's linear probe: near-uniform start
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens):
        """tokens: (B, 1+L, D) -> logits (B, K)."""
        x = tokens[:, 1:].mean(dim=1) if self.pool == 'mean' else tokens[:, 0]
        return self.head(self.fc_norm(x))


def _up(cin, cout):
    """Learned 2x upsampling: transposed conv (kernel = stride = 2), BatchNorm, ReLU."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _conv(cin, cout):
    """3x3 conv, BatchNorm, ReLU (no conv bias: the norm cancels it)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _stage_widths(channels, num_stages):
    """One width per 2x stage, coarsest first: the last widths go to the finest stages (the expensive ones); extra
    coarse stages repeat the first width, surplus widths are dropped from the front."""
    channels = list(channels)
    if num_stages <= len(channels):
        return channels[len(channels) - num_stages:]
    return [channels[0]] * (num_stages - len(channels)) + channels


class SegmentationHead(nn.Module):
    """UNETR-style decoder for a ViT, convolutions only: (B, K, H, W) logits.

    The outputs of four evenly spaced blocks (`block_ids`, the last one = depth-1) are reshaped to (B, D, g, g).
    The deepest starts the decoder path: log2(p) stages, each a 2x transposed-conv upsampling, a concatenation of
    the skips of that resolution and one conv block (one, not UNETR's two: cheap on CPU). As in UNETR the three
    other features reach their stage's resolution through transposed convs: the 3rd at 2g, the 2nd at 4g, the 1st
    at 8g. For p=16 that is UNETR's layout; smaller patches have fewer stages, and a feature whose stage would be
    the last (full resolution) joins the one before. The last stage also takes a conv block of the image itself.
    Stage widths come from `channels` (deepest first), see _stage_widths: for p=8, (64, 32, 16) exactly.
    """

    def __init__(self, embed_dim, patch_size, in_chans, num_classes, depth, channels=(64, 32, 16)):
        super().__init__()
        if patch_size < 4 or patch_size & (patch_size - 1):
            raise ConfigError(f'the segmentation decoder needs a power-of-two patch size >= 4, model.patch_size is '
                              f'{patch_size}')
        if depth < 4:
            raise ConfigError(f'the segmentation decoder reads 4 blocks: model.depth is {depth}, use 4 or more')
        self.patch_size = patch_size
        self.block_ids = [depth * (i + 1) // 4 - 1 for i in range(4)]
        num_stages = int(math.log2(patch_size))
        widths = _stage_widths(channels, num_stages)
        # Feature j (0 = shallowest of the three skips) joins stage min(2 - j, num_stages - 2), 0 = coarsest.
        self.skip_stage = [min(2 - j, num_stages - 2) for j in range(3)]
        self.skips = nn.ModuleList(
            nn.Sequential(_up(embed_dim, widths[s]), *[_up(widths[s], widths[s]) for _ in range(s)])
            for s in self.skip_stage)
        self.image_skip = _conv(in_chans, widths[-1])
        self.ups, self.fuse = nn.ModuleList(), nn.ModuleList()
        for s, width in enumerate(widths):
            n_skips = self.skip_stage.count(s) + (s == num_stages - 1)
            self.ups.append(_up(widths[s - 1] if s else embed_dim, width))
            self.fuse.append(_conv(width * (1 + n_skips), width))
        self.out = nn.Conv2d(widths[-1], num_classes, 1)

    def forward(self, features, image):
        """features: 4 x (B, L, D) from block_ids, shallow to deep; image: (B, C, H, W) -> logits (B, K, H, W)."""
        B, _, H, W = image.shape
        g_h, g_w = H // self.patch_size, W // self.patch_size
        # Channels-last throughout: the token maps are that layout already (a view, no copy), and CPU convolutions
        # run faster in it than in NCHW.
        maps = [f.unflatten(1, (g_h, g_w)).permute(0, 3, 1, 2) for f in features]  # 4 x (B, D, g, g)
        image = image.contiguous(memory_format=torch.channels_last)
        skips = [[] for _ in self.ups]
        for branch, s, feature in zip(self.skips, self.skip_stage, maps[:3]):
            skips[s].append(branch(feature))  # (B, width, g * 2^(s+1), ...)
        skips[-1].append(self.image_skip(image))  # (B, width, H, W)
        x = maps[-1]
        for up, fuse, extra in zip(self.ups, self.fuse, skips):
            x = fuse(torch.cat([up(x), *extra], dim=1))  # 2x larger each stage
        return self.out(x)


class TaskModel(nn.Module):
    """Backbone + head (keys backbone.*, head.*); forward(x) -> logits. Stage 2's model, and stage 1's DINO student."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        if isinstance(self.head, SegmentationHead):  # UNETR needs several blocks' outputs and the image itself
            return self.head(self.backbone.get_intermediate_layers(x, self.head.block_ids), x)
        return self.head(self.backbone.forward_features(x))


# --------------------------------------------------------------------------------------------------------------------
# Builders from the config (plain functions, no registry)

# timm's ViT sizes; image and patch size those of the official checkpoints (MAE's ViT-H uses 14-pixel patches).
PRESETS = {
    'vit_tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'vit_small': dict(embed_dim=384, depth=12, num_heads=6),
    'vit_base': dict(embed_dim=768, depth=12, num_heads=12),
    'vit_large': dict(embed_dim=1024, depth=24, num_heads=16),
    'vit_huge': dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
}
_PRESET_DEFAULTS = dict(img_size=224, patch_size=16, in_chans=3, mlp_ratio=4.0)
_VIT_ARGS = ('img_size', 'patch_size', 'in_chans', 'mlp_ratio', 'embed_dim', 'depth', 'num_heads')


def vit_kwargs(model_cfg):
    """Config `model:` section -> VisionTransformer kwargs: the preset's sizes, then every non-null key. The preset
    name and each value's range are config.SCHEMA's; the rules between the resolved sizes are checked here."""
    cfg = dict(model_cfg)
    preset = cfg.pop('preset', None)
    kwargs = {**_PRESET_DEFAULTS, **PRESETS[preset]} if preset else {}
    kwargs.update({k: v for k, v in cfg.items() if v is not None})
    if 'in_chans' in cfg and cfg['in_chans'] is None:   # null follows the data: the stages resolve it (data.prepare)
        kwargs['in_chans'] = 1                            # before building; where no data is read, images are grey
    lacking = [k for k in _VIT_ARGS if k not in kwargs]
    if lacking:
        raise ConfigError(f'model.preset is null: give every size, missing {", ".join("model." + k for k in lacking)}')
    if kwargs['img_size'] % kwargs['patch_size']:
        raise ConfigError(f"model.img_size {kwargs['img_size']} is not a multiple of model.patch_size "
                          f"{kwargs['patch_size']}")
    if kwargs['embed_dim'] % math.lcm(4, kwargs['num_heads']):
        raise ConfigError(f"model.embed_dim {kwargs['embed_dim']} must be a multiple of 4 (the sin-cos position table) "
                          f"and of model.num_heads {kwargs['num_heads']}")
    return {k: kwargs[k] for k in _VIT_ARGS}


def build_backbone(cfg):
    return VisionTransformer(**vit_kwargs(cfg['model']))


def build_mae(cfg):
    return MaskedAutoencoder(**vit_kwargs(cfg['model']), **cfg['mae'])


def build_head(cfg, num_classes, arch=None):
    """The finetune.task head for a backbone of `arch` (a model's resolved .arch; by default the config's)."""
    ft, kw = cfg['finetune'], arch or vit_kwargs(cfg['model'])
    if ft['task'] == 'classification':
        return ClassificationHead(kw['embed_dim'], num_classes, ft['pool'])
    return SegmentationHead(kw['embed_dim'], kw['patch_size'], kw['in_chans'], num_classes, kw['depth'],
                            tuple(ft['seg_channels']))
