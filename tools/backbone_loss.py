"""The MAE loss of shipped backbones on fresh upstream images of each kind (weights/README.md's table).

    python tools/backbone_loss.py weights/backbone-a94dab69ce.pth weights/backbone-7434eacbb9.pth

64 new images per kind (CT, MRI and ultrasound slices of patients no backbone saw, and textures), one fixed mask at
ratio 0.75, norm-pix loss on the masked patches; beside it the best constant guess (each patch's mean) and an
untrained MAE of the default config.
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the project's modules, from any folder
import checkpoints  # noqa: E402
import config  # noqa: E402
import models  # noqa: E402
import synthetic  # noqa: E402

SEED, N = 777, 64   # another seed than any backbone's upstream images


def images(kind, size):
    """N images of one kind in [0, 1], (N, 1, size, size)."""
    if kind == 'texture':
        ims = synthetic.upstream_textures(N, size, SEED)
    else:
        ims = sum((synthetic.upstream_patient(j, kind, 8, SEED) for j in range(N // 8)), [])
    return torch.tensor(np.stack(synthetic.resized(ims, size)) / 255.0, dtype=torch.float32)[:, None]


def losses(paths):
    """{kind: [loss of each backbone in paths, per-patch mean guess, untrained MAE]}."""
    cfg = config.load_config(config.REFERENCE_CONFIG)
    torch.manual_seed(0)
    mae, untrained = models.build_mae(cfg), models.build_mae(cfg)
    mean, std = cfg['data']['mean'][0], cfg['data']['std'][0]
    table = {}
    for kind in ('ct', 'mri', 'us', 'texture'):
        x = (images(kind, cfg['model']['img_size']) - mean) / std
        row = []
        with torch.no_grad():
            for model, path in [(mae, p) for p in paths] + [(untrained, None)]:
                if path:
                    checkpoints.load_checkpoint(model, path)
                torch.manual_seed(1)                       # the same mask for every model
                loss, pred, mask = model(x, 0.75)
                row.append(loss.item())
            row.insert(-1, mae.forward_loss(x, torch.zeros_like(pred), mask).item())
        table[kind] = row
    return table


def main(paths):
    print('kind    ' + ''.join(f'{Path(p).stem:>24}' for p in paths) + '  per-patch mean  untrained')
    for kind, row in losses(paths).items():
        print(f'{kind:<8}' + ''.join(f'{v:>24.3f}' for v in row[:-2]) + f'{row[-2]:>16.3f}{row[-1]:>11.2f}')


if __name__ == '__main__':
    main(sys.argv[1:])
