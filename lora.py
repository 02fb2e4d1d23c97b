"""The target parameters: PEFT modules written by hand, and the few functions that decide what trains and what is saved.

TPP pre-trains exactly these parameters (stage 1) and fine-tunes them from there (stage 2). Every target lives in a
module that subclasses `Target`; that one rule (by module type, never by a name substring) decides freezing, saving
and loading, so a task head or a `*bias*` name can never be caught by mistake.

    inject(vit, cfg['peft'])              # insert LoRA / adapters / prompts into the encoder blocks only
    mark_trainable(vit, extra=head)       # backbone requires_grad=False, targets (and the head) True
    target_state_dict(vit)                # only the targets: the file stage 1 writes, a tiny fraction of the backbone
    load_target_state_dict(vit, sd)       # strict: a missing, unexpected or mis-shaped target is an error
"""
import fnmatch
import hashlib
import math
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ConfigError, UserError
from models import build_backbone, is_decoder_key


class Target(nn.Module):
    """Marker base class: every parameter owned by a Target module is a target parameter (the only rule)."""


# ----------------------------------------------------------------------------------------------------------------------
# The targets: LoRA, adapters, prompts

class LoRA(Target):
    """Low-rank update of a linear layer: y + s * B(A(dropout(x))), s = alpha / r.

    `slices` chooses the output rows to adapt, each slice with its own rank-r pair (A_i, B_i), as the LoRA paper adapts
    W_q and W_v separately inside a fused qkv; None adapts all rows with one pair. A is Kaiming-uniform and B is zero,
    so an injected model starts exactly equal to the backbone.
    """

    def __init__(self, in_features, out_features, r, alpha, dropout=0.0, slices=None):
        super().__init__()
        slices = slices or [(0, out_features)]
        widths = {stop - start for start, stop in slices}
        assert len(widths) == 1, f'LoRA slices must have equal widths, got {slices}'
        self.r, self.groups, self.width, self.out_features = r, len(slices), widths.pop(), out_features
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A = nn.Parameter(torch.empty(self.groups * r, in_features))     # (g*r, in)
        self.B = nn.Parameter(torch.zeros(self.groups * self.width, r))       # (g*d, r): zero, so delta starts at 0
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))                      # as nn.Linear and loralib
        rows = torch.cat([torch.arange(start, stop) for start, stop in slices])
        self.register_buffer('rows', None if len(rows) == out_features else rows, persistent=False)

    def forward(self, x, y):
        """y + s * B(A x): the base layer's output y (..., out) plus the update of its input x (..., in). B is
        block-diagonal, so with slices the rows of slice i get s * B_i(A_i x)."""
        sAx = self.scaling * (self.dropout(x) @ self.A.t())                  # (..., g*r): s on the narrow side
        B = torch.block_diag(*self.B.view(self.groups, self.width, self.r))   # (g*d, g*r)
        if self.rows is None:
            return y + sAx @ B.t()
        return y.index_add(-1, self.rows, (sAx @ B.t()).to(y.dtype))         # only the adapted slices' rows

    def delta_weight(self, A=None, B=None):
        """The update as a dense (out, in) matrix, for merging: scaling * B_i A_i placed on each slice's rows. A, B:
        other factors of this module's shapes (stage 1's, for update_survival) in place of its own."""
        A = (self.A if A is None else A).view(self.groups, self.r, -1)         # (g, r, in)
        B = (self.B if B is None else B).view(self.groups, self.width, self.r)  # (g, d, r)
        dW = (B @ A).flatten(0, 1) * self.scaling                              # (g*d, in)
        if self.rows is None:
            return dW
        return torch.zeros(self.out_features, dW.shape[1], dtype=dW.dtype, device=dW.device).index_copy_(0, self.rows, dW)


class LoRALinear(nn.Linear):
    """nn.Linear with a LoRA child. It keeps the base layer's `weight` and `bias` (the same tensors), so
    `blocks.3.attn.qkv.weight` keeps its name and backbone checkpoints load before or after injection;
    the targets are `blocks.3.attn.qkv.lora.A` and `.lora.B`."""

    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0, slices=None):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device='meta')
        self.weight, self.bias = base.weight, base.bias                       # share, do not copy, the backbone
        self.lora = LoRA(base.in_features, base.out_features, r, alpha, dropout, slices).to(base.weight.device)
        self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y if self.merged else self.lora(x, y)

    @torch.no_grad()
    def merge(self):
        """Fold the update into `weight` for inference: same outputs, no extra cost."""
        if not self.merged:
            self.weight += self.lora.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.lora.delta_weight().to(self.weight.dtype)
            self.merged = False


class Adapter(Target):
    """Bottleneck adapter, called by models.Block as adapter(x, y) -> y' where x is the residual stream entering a
    branch (before its norm) and y the branch output.

    parallel   (AdaptFormer): y + s * up(relu(down(x)))    beside the MLP, reading x as AdaptFormer does
    sequential (Houlsby):     y + s * up(relu(down(y)))    after attention and after the MLP
    `up` and the `down` bias are zero-initialised (AdaptFormer's init), so an injected model starts exactly equal to
    the backbone. kind: peft.adapter.kind (config.SCHEMA checks its values).
    """

    def __init__(self, dim, bottleneck, scale, kind):
        super().__init__()
        self.kind, self.scale = kind, scale
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x, y):                                                   # (B, N, D), (B, N, D)
        src = x if self.kind == 'parallel' else y
        return y + self.scale * self.up(F.relu(self.down(src)))


class Prompt(Target):
    """Visual prompt tuning (VPT): N learned tokens that models.VisionTransformer places after the cls token: before
    the first block only (shallow, tokens (1, N, D)) or anew before every block (deep, tokens (depth, N, D)), replacing
    the previous block's. They carry no position embedding and are dropped from the encoder's outputs. Init as VPT:
    uniform in +-sqrt(6 / (C*p*p + D)), the xavier bound of the patch projection (VPT writes C = 3), so they start at
    the scale of patch embeddings."""

    def __init__(self, depth, tokens, dim, patch_dim):
        super().__init__()
        val = math.sqrt(6.0 / (patch_dim + dim))
        self.tokens = nn.Parameter(torch.empty(depth, tokens, dim).uniform_(-val, val))

    def forward(self, x, i):
        """x: tokens entering block i, (B, 1+L, D) for i = 0, else (B, 1+N+L, D) -> (B, 1+N+L, D)."""
        if i >= len(self.tokens):                                              # shallow: block 0's output travels on
            return x
        prompts = self.tokens[i].expand(len(x), -1, -1)                       # (B, N, D)
        return torch.cat([x[:, :1], prompts, x[:, 1 + self.tokens.shape[1] * (i > 0):]], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Insert the targets

def inject(model, peft):
    """Insert the configured targets (the `peft:` config section) into `model.blocks`, the encoder, and nowhere else
    (prompts go to the encoder's `prompt` slot): the MAE decoder has `attn.qkv` layers too and must never receive
    targets. Returns the number of modules added."""
    lora, adapter, prompt = peft['lora'], peft['adapter'], peft['prompt']
    added = 0
    if lora['r'] > 0:
        linears = {f'blocks.{name}': m for name, m in model.blocks.named_modules() if type(m) is nn.Linear}
        for pattern in lora['layers']:
            matched = [n for n in linears if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(n, '*.' + pattern)]
            if not matched:
                kinds = sorted({n.split('.', 2)[2] for n in linears})
                raise ConfigError(f"peft.lora.layers: '{pattern}' matches no linear layer of the encoder blocks; "
                                 f"they are {', '.join(kinds)} (in blocks.0-{len(model.blocks) - 1})")
            for name in matched:
                parent, attr = name.rsplit('.', 1)
                layer = linears.pop(name)
                slices = _lora_slices(name, layer, lora['qv_only'])
                model.get_submodule(parent).register_module(
                    attr, LoRALinear(layer, lora['r'], lora['alpha'], lora['dropout'], slices))
                added += 1
    if adapter['kind'] != 'none':
        for blk in model.blocks:
            dim = blk.norm1.normalized_shape[0]
            make = lambda: Adapter(dim, adapter['dim'], adapter['scale'], adapter['kind']).to(blk.norm1.weight.device)
            if adapter['kind'] == 'sequential':
                blk.adapter_attn = make()
                added += 1
            blk.adapter_mlp = make()
            added += 1
    if prompt['tokens'] > 0:
        proj = model.patch_embed.proj.weight                                   # (D, C, p, p)
        model.prompt = Prompt(len(model.blocks) if prompt['deep'] else 1, prompt['tokens'], proj.shape[0],
                              proj[0].numel()).to(proj.device)
        added += 1
    return added


def _lora_slices(name, layer, qv_only):
    if not qv_only or not name.endswith('qkv'):
        return None
    d = layer.out_features // 3
    return [(0, d), (2 * d, 3 * d)]                                            # q and v; k stays untouched


def check_layers(cfg):
    """Insert the configured targets into the configured encoder built on the meta device (shapes only, no memory):
    a peft.lora.layers pattern that matches no layer is refused before anything runs."""
    with torch.device('meta'):
        inject(build_backbone(cfg), cfg['peft'])


# ----------------------------------------------------------------------------------------------------------------------
# Freeze, filter, save, load

def target_parameters(model):
    """(name, parameter) for every target parameter of `model`: those owned by an injected Target module."""
    for mod_name, module in model.named_modules():
        if isinstance(module, Target):
            yield from module.named_parameters(prefix=mod_name)


def mark_trainable(model, extra=(), targets=True):
    """Set requires_grad on every parameter, explicitly: targets (unless targets=False) and `extra` (a task head, the
    pretext decoder) train, everything else (the backbone) is frozen. TPP's first rule: the backbone never changes.
    Returns the counts."""
    train = {id(p) for _, p in target_parameters(model) if targets} | {id(p) for p in extra}
    for p in model.parameters():
        p.requires_grad = id(p) in train
    return param_counts(model)


def param_counts(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    targets = sum(p.numel() for _, p in target_parameters(model))
    return {'total': total, 'trainable': trainable, 'targets': targets, 'targets_pct': 100.0 * targets / total}


def target_state_dict(model):
    """Only the target parameters, detached copies: what stage 1 saves and stage 2 loads."""
    return {name: p.detach().clone() for name, p in target_parameters(model)}


def load_target_state_dict(model, sd):
    """Load targets strictly (a missing, unexpected or mis-shaped key is an error naming it and the likely cause) and
    make them trainable: stage 2 fine-tunes them from here."""
    params = dict(target_parameters(model))
    missing, unexpected = sorted(params.keys() - sd.keys()), sorted(sd.keys() - params.keys())
    if missing or unexpected:
        raise TargetMismatchError(
            f'saved targets ({_summary(sd)}) do not match this model\'s ({_summary(params)}): '
            f'missing {missing[:4]}{" ..." if len(missing) > 4 else ""}, '
            f'unexpected {unexpected[:4]}{" ..." if len(unexpected) > 4 else ""} '
            f'(peft.lora.layers / peft.adapter.kind / peft.prompt.tokens)')
    for name, p in params.items():
        if sd[name].shape != p.shape:
            raise TargetMismatchError(f'target {name}: saved shape {tuple(sd[name].shape)}, model shape '
                                      f'{tuple(p.shape)}: {_shape_cause(model, sd, name)}')
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(sd[name])
            p.requires_grad = True


def merge(model):
    """Fold every LoRA update into its base weight (inference); adapters are non-linear and stay as they are."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()


def unmerge(model):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()


def merged_state_dict(model):
    """The inference export: every LoRA update folded into its base weight (in place), the LoRA factors left out, so
    the backbone's keys are those of a plain ViT. Adapters (non-linear) stay. Chosen by module type, like the rest."""
    merge(model)
    factors = {name for name, m in model.named_modules() if isinstance(m, LoRA)}
    return {k: v for k, v in model.state_dict().items() if k.rsplit('.', 1)[0] not in factors}


# ----------------------------------------------------------------------------------------------------------------------
# The targets file: the targets plus what they were pre-trained for

def backbone_fingerprint(model):
    """A short hash of the backbone weights (encoder parameters that are not targets), stored with the targets so
    stage 2 can check it fine-tunes them on the very backbone they were pre-trained on."""
    targets = {name for name, _ in target_parameters(model)}
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if name not in targets and not is_decoder_key(name):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def structure(model):
    """What each target module multiplies its output by (LoRA: alpha / r; adapters: kind and scale), resolved on the
    model: with the target keys and shapes (checked on loading) this fixes what the targets compute, so equivalent
    settings (layers [qkv] or [attn.qkv]; any alpha with r 0) compare equal."""
    return {name: m.scaling if isinstance(m, LoRA) else [m.kind, m.scale] if isinstance(m, Adapter) else None
            for name, m in model.named_modules() if isinstance(m, Target)}   # prompts: their shape says it all


def load_targets(path, model, expected):
    """Stage 2's side of TPP: check a targets file against this run, then load its targets into `model`. Returns
    (meta, targets): the file's metadata and its state dict of targets."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except UNREADABLE_FILE_ERRORS as e:
        raise TargetMismatchError(f'{path}: not a readable targets file (empty, truncated or another kind of file: '
                                  f'{type(e).__name__}): pre-train the targets again') from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('meta'), dict) or 'targets' not in ckpt:
        raise TargetMismatchError(f'{path}: no meta / targets: not a targets file written by pretrain_targets.py')
    if not all(torch.isfinite(v).all() for v in ckpt['targets'].values()):
        raise TargetMismatchError(f'{path}: NaN or Inf in the targets: their pre-training diverged (lower pretrain.lr)')
    check_meta(ckpt['meta'], expected, path)
    load_target_state_dict(model, ckpt['targets'])   # names a missing, unexpected or mis-shaped target
    check_meta(ckpt['meta'], expected, path, ('peft',))
    return ckpt['meta'], ckpt['targets']


def check_meta(saved, expected, path, keys=('arch', 'backbone')):
    """Compare a targets file's metadata with this run; a difference is an error that says which setting differs."""
    what = {'arch': 'model.*', 'backbone': 'backbone.checkpoint', 'peft': 'peft.lora.alpha / r, peft.adapter.scale'}
    for key in keys:
        if saved.get(key) != expected[key]:
            old, new = saved.get(key), expected[key]
            if key == 'peft':   # the keys are equal by now (load_target_state_dict): name one module that differs
                name = next(k for k in new if old.get(k) != new[k])
                old = f'{name} scaling {old[name]}' if name in old else f'no record of {name}'
                new = new[name]
            raise TargetMismatchError(
                f'{path}: the targets were pre-trained with {key} {old}, this run has {new} ({what[key]}): '
                f'pre-train them again with the same settings, or set finetune.init=random')


# ----------------------------------------------------------------------------------------------------------------------
# How far fine-tuning moved LoRA (stage 2's diagnostics: pure functions of the modules and the saved targets)

@torch.no_grad()
def update_ratio(model):
    """Per LoRA layer of `model` ||s*BA||_F / ||W||_F, W the frozen base weight of the adapted rows (the q and v
    slices with qv_only), and the median over layers: a small ratio is PEFT adapting the backbone, a large one
    LoRA rewriting it. {'median': ..., 'per_layer': {layer: ratio}}."""
    ratios = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            dW = m.lora.delta_weight().double()                                 # (out, in), zero off the slices
            W = m.weight.double() - dW if m.merged else m.weight.double()       # the base weight
            ratios[name] = (dW.norm() / (W if m.lora.rows is None else W[m.lora.rows]).norm()).item()
    return {'median': _median(ratios.values()), 'per_layer': ratios}


@torch.no_grad()
def update_survival(stage1_targets, model):
    """Does the pre-trained update survive fine-tuning? Per LoRA layer of `model`, between the stage-1 update s*B1A1
    (stage1_targets: the targets file's state dict) and the model's final s*BA: the cosine of the two (1: the same
    direction, 0: unrelated, -1: reversed) and the ratio of their Frobenius norms, final / stage-1; and the medians
    over layers. {'cosine': ..., 'norm_ratio': ..., 'per_layer': {layer: {'cosine': ..., 'norm_ratio': ...}}}."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            A, B = (stage1_targets[f'{name}.lora.{k}'].to(m.lora.A.device) for k in 'AB')
            start = m.lora.delta_weight(A, B).double().flatten()
            final = m.lora.delta_weight().double().flatten()
            layers[name] = {'cosine': (start @ final / (start.norm() * final.norm())).item(),
                            'norm_ratio': (final.norm() / start.norm()).item()}
    return {k: _median(layer[k] for layer in layers.values()) for k in ('cosine', 'norm_ratio')} | {'per_layer': layers}


def _median(values):
    return torch.tensor(list(values), dtype=torch.float64).quantile(0.5).item()


# ----------------------------------------------------------------------------------------------------------------------
# Errors and their messages

class TargetMismatchError(UserError, ValueError):
    """Saved targets do not fit this model (keys, shapes or the recorded backbone / PEFT settings)."""


# What torch.load raises for an empty, truncated or non-PyTorch file (the targets file here, backbone checkpoints in
# checkpoints.py): caught to name the file instead of a traceback from deep inside the unpickler.
UNREADABLE_FILE_ERRORS = (EOFError, RuntimeError, KeyError, IndexError, pickle.UnpicklingError, IsADirectoryError)


def _summary(keys):
    """'lora on attn.qkv x6, adapter_mlp x6': which module kinds a set of target keys covers."""
    kinds = {}
    for k in keys:
        parts = k.split('.')
        kind = ('lora on ' + '.'.join(parts[2:-2])) if parts[-2] == 'lora' else parts[2 if parts[0] == 'blocks' else 0]
        kinds.setdefault(kind, set()).add(parts[1])
    return ', '.join(f'{kind} x{len(blocks)}' for kind, blocks in sorted(kinds.items())) or 'nothing'


def _shape_cause(model, sd, key):
    """The likely config setting behind a mis-shaped target key, read from the saved shapes of its module."""
    owner_name = key.rsplit('.', 1)[0]
    owner, prefix = model.get_submodule(owner_name), owner_name + '.'
    if isinstance(owner, LoRA):
        saved_groups = sd[prefix + 'B'].shape[0] // owner.width
        if saved_groups != owner.groups:
            return f'saved with qv_only={saved_groups == 2}, config has qv_only={owner.groups == 2} (peft.lora.qv_only)'
        if sd[prefix + 'A'].shape[1] == owner.A.shape[1]:
            return f'saved with rank {sd[prefix + "A"].shape[0] // saved_groups}, config has rank {owner.r} (peft.lora.r)'
    if isinstance(owner, Prompt) and sd[key].shape[2:] == owner.tokens.shape[2:]:
        (saved_blocks, saved_n), (blocks, n) = sd[key].shape[:2], owner.tokens.shape[:2]
        return f'saved {saved_n} prompt tokens in {saved_blocks} block(s), config has {n} in {blocks} (peft.prompt.*)'
    if key.endswith('down.weight') and sd[key].shape[1:] == owner.weight.shape[1:]:
        return f'saved with adapter dim {sd[key].shape[0]}, config has {owner.weight.shape[0]} (peft.adapter.dim)'
    return 'the backbone width differs (model.*)'
