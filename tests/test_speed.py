"""tools/speed.py: the tiny mode runs and reports every row; the FLOP count follows the documented formula.
Timings are never asserted (they depend on the machine and its load)."""
import json
import statistics

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.flop_counter import FlopCounterMode

import models
from tools import speed


@pytest.fixture(scope='module')
def config(tmp_path_factory, cache):
    path = tmp_path_factory.mktemp('speed') / 'speed.yaml'
    path.write_text(yaml.safe_dump({'run': {'cache_dir': str(cache), 'device': 'cpu'}}))
    return path


def test_tiny_bench_reports_every_row(config, tmp_path, capsys):
    out = tmp_path / 'bench.json'
    report = speed.main(['--config', str(config), '--tiny', '--reference', '--out', str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))

    (preset,) = report['presets']
    precisions = list(preset['matmul_peak_gflops'])                     # fp32, and bf16 where the CPU has it
    assert precisions[0] == 'fp32' and set(precisions) <= {'fp32', 'bf16'}
    ours = [*speed.TRAIN_ROWS, *speed.INFER_ROWS]
    expected = {(row, 'fp32') for row in [*ours, 'loader']} | {(row, p) for row in ours for p in precisions[1:]}
    if report['machine']['timm'] and report['machine']['peft']:
        expected |= {('ref_' + row, 'fp32') for row in speed.REFERENCE_ROWS}
    else:
        assert 'not installed' in report['reference']
    rows = {(r['row'], r['precision']): r for r in preset['rows']}
    assert rows.keys() == expected

    printed = capsys.readouterr().out
    for (name, precision), r in rows.items():
        assert 'error' not in r, r
        assert len(r['step_times']) == 2 and r['s_per_step'] == statistics.median(r['step_times'])
        assert r['images_per_s'] == pytest.approx(r['batch'] / r['s_per_step'])
        if name.startswith('ref_'):                                    # timed in turn with tpp's own step
            assert r['memory_mib'] is None
            (ours,) = [line for line in printed.splitlines() if line.startswith(f'| {name[4:]} | fp32 |')]
            assert ours.endswith(f"| {r['tpp_over_ref']:.2f} |")                  # its 'vs ref' column
        else:
            assert r['memory_mib'] >= 0
        if name == 'loader':
            assert r['gflop_per_step'] is None
        else:
            peak = preset['matmul_peak_gflops'][precision]
            assert r['pct_of_peak'] == pytest.approx(100 * r['gflop_per_step'] / r['s_per_step'] / peak)
        assert f'| {name} | {precision} |' in printed
    # merged LoRA costs the plain ViT's FLOPs exactly; unmerged LoRA costs more
    fp32 = {name: r for (name, precision), r in rows.items() if precision == 'fp32'}
    assert fp32['infer_merged']['gflop_per_step'] == fp32['infer_plain']['gflop_per_step']
    assert fp32['infer_lora']['gflop_per_step'] > fp32['infer_plain']['gflop_per_step']
    # each training row trains what its method trains: the targets (+ decoder, head) are a fraction of the model
    fp32 = {name: r for (name, precision), r in rows.items() if precision == 'fp32'}
    assert fp32['linear']['trainable_params'] < fp32['peft_cls']['trainable_params'] < fp32['full_ft']['trainable_params']
    assert fp32['tpp_lora']['trainable_params'] < fp32['mae_full']['trainable_params']
    if ('ref_peft_cls', 'fp32') in rows:                               # the same LoRA in peft: the same count
        assert fp32['ref_peft_cls']['trainable_params'] == fp32['peft_cls']['trainable_params']
        assert fp32['ref_tpp_lora']['trainable_params'] == fp32['tpp_lora']['trainable_params']
    assert {t['target'].split(' ')[0] for t in preset['targets']} >= {'training', 'stage-1', 'merged-LoRA', 'loader'}


def test_bench_says_when_the_reference_is_missing(config, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(speed, 'versions', lambda: {'timm': '1.0', 'peft': None})
    report = speed.main(['--config', str(config), '--tiny', '--reference', '--rows', 'linear', '--bf16', 'off',
                         '--out', str(tmp_path / 'bench.json')])
    assert [r['row'] for r in report['presets'][0]['rows']] == ['linear']
    assert 'Reference rows not run: peft not installed' in capsys.readouterr().out


def test_flop_count_matches_the_documented_formula():
    """Forward d * ((8 + 4m) N D^2 + 4 N^2 D) + 2 L p^2 C D per image, counted on CPU (attention included); a full
    training step: linears 3x (input and weight gradients), attention 1 + 2.5x, the patch conv 2x (no input grad)."""
    B, S, p, C, D, d, m = 3, 32, 8, 1, 32, 2, 2.0
    vit = models.VisionTransformer(S, p, C, D, d, num_heads=2, mlp_ratio=m)
    x = torch.randn(B, C, S, S)
    L = (S // p) ** 2
    N = L + 1
    linear, attention, conv = B * d * (8 + 4 * m) * N * D ** 2, B * d * 4 * N ** 2 * D, B * 2 * L * p * p * C * D
    speed.count_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        out = vit(x)
    assert counter.get_total_flops() == linear + attention + conv
    with FlopCounterMode(display=False) as counter:
        F.mse_loss(vit(x), out.detach()).backward()
    assert counter.get_total_flops() == 3 * linear + 3.5 * attention + 2 * conv
