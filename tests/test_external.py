"""Sites and external test sets: the synthetic generators' site setting (site 0 is the reference data, byte for
byte), the built-in MRI-like set, and stage 2's evaluation of a second data set of the same task."""
import csv
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import engine
import finetune
import predictions
import pretrain_backbone
import pretrain_targets
import runs
import synthetic
from conftest import args, tiny_config
from test_data import dcfg  # noqa: F401  (fixture)


def digest(root):
    """sha256 over a written tree: every file's relative path and bytes, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(root.rglob('*')):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_site_0_writes_the_reference_files_byte_for_byte(tmp_path):
    # the first cases of the default sets, digests taken from the generators before they had a site setting: the
    # shipped backbone and the committed results were made on these files
    synthetic.write_synthetic_ct(tmp_path / 'ct', n_cases=4)
    synthetic.write_synthetic_us(tmp_path / 'us', n_per_class=3)
    assert digest(tmp_path / 'ct') == '1a11458de18ec649d8e17d66c2717183a597ad2254bad2e5388f3f41b92d04d1'
    assert digest(tmp_path / 'us') == 'b4504a88c0eef8a38da3b830074f61f8a6219cee0ad3d136a7b0ccd39b856e97'
    assert synthetic.GENERATOR_VERSION == 2 and synthetic.SITES[0] == dict(gain=1, noise=1, resolution=1, contrast=1)
    cfg = config.load_config(config.REFERENCE_CONFIG, ['model.in_chans=1'])           # as the stages resolve it
    assert pretrain_backbone.default_path(cfg)[0].parent == pretrain_backbone.WEIGHTS   # the shipped one


def _ct(root, i, folder='imagesTr'):
    return np.asarray(nib.load(root / folder / f'ct_{i:03d}.nii.gz').dataobj).astype(np.float32)


def test_a_second_site_has_other_patients_and_other_intensity_statistics(tmp_path, monkeypatch):
    small = dict(n_cases=4, shape=(96, 96, 28), spacing=(3.6, 3.6, 5.0))
    monkeypatch.setattr(synthetic, 'SYNTH_CT', small)
    root = {s: synthetic.synthetic_root('ct', tmp_path, site=s) for s in (0, 1)}
    assert root[0].name == 'synthetic_ct-v2-seed0-n_cases4-shape96x96x28-spacing3.6x3.6x5.0'   # as before sites
    assert root[1].name == 'synthetic_ct-v2-seed0-site1-n_cases4-shape96x96x28-spacing3.6x3.6x5.0'
    masks = {s: [_ct(root[s], i, 'labelsTr') for i in range(4)] for s in (0, 1)}
    assert not any(np.array_equal(a, b) for a, b in zip(masks[0], masks[1]))           # new patients
    liver_std = {s: np.mean([_ct(root[s], i)[m == 1].std() for i, m in enumerate(masks[s])]) for s in (0, 1)}
    assert liver_std[1] > 1.15 * liver_std[0]                                           # noisier scanner
    assert 'site 1' in json.loads((root[1] / 'dataset.json').read_text())['description']

    for s in (0, 1):
        synthetic.write_synthetic_us(tmp_path / f'us{s}', n_per_class=2, site=s)
        synthetic.write_synthetic_mri(tmp_path / f'mri{s}', n_cases=2, site=s)
    us = {s: np.stack([np.array(Image.open(p), np.float32) for p in sorted((tmp_path / f'us{s}').glob('*/*[0-9].png'))])
          for s in (0, 1)}
    assert us[1].std() > 1.15 * us[0].std() and us[1].mean() > us[0].mean()            # speckle contrast, gain
    mri = {s: np.asarray(nib.load(tmp_path / f'mri{s}/imagesTr/mri_000.nii.gz').dataobj) for s in (0, 1)}
    air = {s: mri[s][:4, :4].mean() for s in (0, 1)}                                    # the Rician noise floor
    assert air[1] > 1.3 * air[0]


def test_synthetic_mri_writes_a_4d_msd_set_whose_sub_regions_need_several_sequences(tmp_path, dcfg, monkeypatch):
    shape = synthetic.SYNTH_MRI['shape']
    for name in 'ab':
        synthetic.write_synthetic_mri(tmp_path / name, n_cases=2, seed=5)
    root = tmp_path / 'a'
    js = json.loads((root / 'dataset.json').read_text())
    assert js['modality'] == {'0': 'T1', '1': 'T2', '2': 'FLAIR'} and js['tensorImageSize'] == '4D'
    assert js['labels'] == {'0': 'background', '1': 'oedema', '2': 'core'}
    rows = list(csv.reader(open(root / 'manifest.csv')))
    assert rows == [['image', 'mask', 'label'], ['imagesTr/mri_000.nii.gz', 'labelsTr/mri_000.nii.gz', 'high_grade'],
                    ['imagesTr/mri_001.nii.gz', 'labelsTr/mri_001.nii.gz', 'low_grade']]
    for i in range(2):
        image, mask = (nib.load(root / folder / f'mri_{i:03d}.nii.gz') for folder in ('imagesTr', 'labelsTr'))
        assert image.shape == (*shape, 3) and image.get_data_dtype() == np.int16 and mask.shape == shape
        assert nib.aff2axcodes(image.affine) == ('L', 'P', 'S') and np.allclose(image.affine, mask.affine)
        assert np.array_equal(image.get_fdata(), nib.load(tmp_path / 'b' / f'imagesTr/mri_{i:03d}.nii.gz').get_fdata())
        m, x = np.asarray(mask.dataobj), image.get_fdata()                              # (X, Y, Z), (X, Y, Z, 3)
        assert set(np.unique(m)) == {0, 1, 2}
        # the core is told from oedema by T1, not by FLAIR; oedema from the rest of the brain by FLAIR, not by T1
        core, oedema = np.median(x[m == 2], 0), np.median(x[m == 1], 0)                 # (3,) T1, T2, FLAIR
        assert core[0] > 1.3 * oedema[0] and abs(core[2] - oedema[2]) < 0.15 * oedema[2]
        like = (m == 0) & (np.abs(x[..., 0] - oedema[0]) < 0.2 * oedema[0])            # oedema's T1 (cortex)
        assert like.sum() > (m == 1).sum() and x[like][:, 2].mean() < 0.75 * oedema[2]

    cases, names = data.read_msd(root)                                                 # a real MSD tree too
    assert [c.id for c in cases] == ['mri_000', 'mri_001'] and names['modalities'] == synthetic.MRI_SEQUENCES

    monkeypatch.setattr(synthetic, 'SYNTH_MRI', dict(n_cases=4, shape=(40, 40, 12), spacing=(6.0, 6.0, 12.0)))
    dcfg['layout'] = 'synthetic_mri'
    cases, names = data.read_cases(dcfg, tmp_path / 'cache')
    assert [c.label for c in cases] == [0, 1, 0, 1] and names['label_names'] == synthetic.MRI_GRADES
    assert names['class_names'] == synthetic.MRI_CLASSES and names['modalities'] == synthetic.MRI_SEQUENCES


def test_site_outside_the_built_in_sites_is_refused():
    assert config.SCHEMA['data.site'].hi == config.SCHEMA['data.external_site'].hi == len(synthetic.SITES) - 1
    for key in ('data.site', 'data.external_site'):
        with pytest.raises(config.ConfigError, match=rf'{key} must be an integer in \[0, 2\], got 3'):
            config.load_config(config.REFERENCE_CONFIG, [f'{key}=3'])


@pytest.mark.parametrize('task', ['segmentation', 'classification'])
def test_external_metrics_equal_evaluating_that_data_as_a_test_split(tmp_path, cache, task):
    cfg = tiny_config(tmp_path, cache, finetune={'epochs': 1, 'init': 'linear', 'task': task})
    run_dir = finetune.main(args(cfg, 'data.external_layout=synthetic_ct'))            # site 1 (external_site)
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    assert metrics['external_data'] == {'name': 'data.layout synthetic_ct (site 1)', 'cases': 64}
    assert metrics['external'].keys() == metrics['test'].keys()
    log = (run_dir / 'log.txt').read_text()
    assert 'external test set: data.layout synthetic_ct (site 1), 64 cases, data.intensity auto -> window' in log
    assert 'external (data.layout synthetic_ct (site 1), 64 cases): {' in log

    # the chosen model, rebuilt from best.pth, on the site-1 data read as a main data set: the same numbers
    run_cfg = config.load_config(cfg)
    run = runs.Run(run_cfg, 'reevaluate')
    dcfg = {**run_cfg['data'], 'site': 1}
    cases, info = data.prepare(dcfg, str(cache), task, run_cfg['model']['in_chans'])
    dcfg['intensity'], run_cfg['model']['in_chans'] = info['modes'], info['in_chans']
    num_classes = info['num_classes_cls' if task == 'classification' else 'num_classes_seg']
    model, _, _ = finetune.build_model(run_cfg, run, pretrain_backbone.resolve(run_cfg), num_classes, 'linear', None)
    engine.load_trainable_state(model, torch.load(run_dir / 'best.pth', weights_only=False)['model'])
    loader = engine.make_loader(run, data.SliceDataset(cases, dcfg, 32, 1, task, train=False), 32, train=False)
    again = predictions.evaluate(run, model, loader, task, num_classes, native=True)
    assert json.dumps(again) == json.dumps(metrics['external'])                         # exactly, NaN included

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / 'tensorboard')).Reload()
    assert {f'external/{k}' for k in again} <= set(events.Tags()['scalars'])


def test_external_set_errors_come_before_anything_runs(tmp_path, cache, monkeypatch):
    cfg = tiny_config(tmp_path, cache)
    monkeypatch.setattr(finetune.pretrain_backbone, 'resolve', lambda cfg: pytest.fail('stage 0 ran before the checks'))
    with pytest.raises(data.DataError, match=r'synthetic_us \(site 1\) has 2 segmentation classes, the main data '
                                             r'data.layout synthetic_ct \(site 0\) 3'):
        finetune.main(args(cfg, 'data.external_layout=synthetic_us'))
    with pytest.raises(data.DataError, match='has 3 classification classes, the main data .* 2'):
        finetune.main(args(cfg, 'data.external_layout=synthetic_us', 'finetune.task=classification'))
    with pytest.raises(config.ConfigError, match='the external test set is the main data itself'):
        finetune.main(args(cfg, 'data.external_layout=synthetic_ct', 'data.external_site=0'))
    with pytest.raises(config.ConfigError, match='data.external_root: .* is built in'):
        finetune.main(args(cfg, f'data.external_root={tmp_path}'))
    with pytest.raises(config.ConfigError, match='data.external_root: must be set for the external layout msd'):
        finetune.main(args(cfg, 'data.external_layout=msd'))
    with pytest.raises(data.DataError, match='imagesTr: folder not found'):
        finetune.main(args(cfg, 'data.external_layout=msd', f'data.external_root={tmp_path}'))
    assert not (tmp_path / 'runs').exists()


def test_synthetic_mri_through_both_stages(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(synthetic, 'SYNTH_MRI', dict(n_cases=16, shape=(48, 48, 12), spacing=(5.0, 5.0, 12.0)))
    cfg = tiny_config(tmp_path, cache, finetune={'epochs': 1})
    mri = 'data.layout=synthetic_mri'
    targets = pretrain_targets.main(args(cfg, mri))
    log = (targets.parent / 'log.txt').read_text()
    assert 'data.intensity auto -> percentile (NIfTI volumes, dataset.json modality T1, T2, FLAIR)' in log
    assert 'model.in_chans null -> 3 (3 channels per image)' in log
    for task, key in (('segmentation', 'dice_2'), ('classification', 'auc')):
        metrics = json.loads((finetune.main(args(cfg, mri, f'finetune.task={task}')) / 'metrics.json').read_text())
        assert np.isfinite(metrics['test'][key]) and metrics['history'][0]['train_loss'] > 0
