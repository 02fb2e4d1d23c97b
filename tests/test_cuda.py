"""The CUDA paths, skipped without a GPU (conftest.py); run them with `python -m pytest -q -m cuda`: a bf16 and an
fp16 training step of each stage, a kill-and-resume on the GPU, the GPU random state, merged LoRA on the GPU."""
import io
import json
import math
from types import SimpleNamespace

import pytest
import torch

import finetune
import lora
import pretrain_targets
import runs
from conftest import args, tiny_config
from test_lora import images, peft, train_steps, vit

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize('amp, dtype', [('bf16', 'torch.bfloat16'), ('fp16', 'torch.float16')])
def test_each_stage_trains_on_cuda(tmp_path, cache, amp, dtype):
    cfg = tiny_config(tmp_path, cache, run={'device': 'cuda', 'amp': amp}, pretrain={'epochs': 1},
                      finetune={'epochs': 1})
    targets = pretrain_targets.main(args(cfg))          # stage 0 too, the first time (the cache is per session)
    assert torch.load(targets, weights_only=True)['meta']['steps'] > 0
    run_dir = finetune.main(args(cfg))
    history = json.loads((run_dir / 'metrics.json').read_text())['history']
    assert math.isfinite(history[0]['train_loss'])
    for log in (targets.parent / 'log.txt', run_dir / 'log.txt'):
        assert f'device cuda:0 | amp {dtype}' in log.read_text()


def test_kill_and_resume_on_cuda(tmp_path, cache, crash_after_checkpoint):
    """Not bit-identical on a GPU: attention and convolution backward kernels are not deterministic there. The resumed
    run ends within rtol 1e-4, atol 1e-5 of an uninterrupted one (fp32, 2 epochs)."""
    cfg = tiny_config(tmp_path, cache, run={'device': 'cuda', 'amp': 'off'}, finetune={'epochs': 2})
    pretrain_targets.main(args(cfg))
    straight = finetune.main(args(cfg, 'finetune.name=straight'))
    with crash_after_checkpoint():
        finetune.main(args(cfg, 'finetune.name=crashed'))
    resumed = finetune.main(args(cfg, 'finetune.name=crashed', resume=True))
    a, b = (torch.load(p / 'best.pth', weights_only=False)['model'] for p in (straight, resumed))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_cuda_random_state_of_the_runs_own_device_round_trips():
    device = torch.device('cuda', torch.cuda.current_device())
    loader = SimpleNamespace(generator=torch.Generator())
    state = runs._rng_state(loader, device)
    assert state['cuda'].device.type == 'cpu'
    expected = torch.rand(4, device=device)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    runs._set_rng_state(torch.load(buf, map_location='cpu', weights_only=False), loader, device)
    assert torch.equal(torch.rand(4, device=device), expected)


def test_merged_lora_equals_unmerged_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)   # runs.pick_device turns TF32 on
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    model = vit()
    lora.inject(model, peft(layers=('qkv', 'proj', 'fc1', 'fc2'), qv_only=True))
    lora.mark_trainable(model)
    train_steps(model)
    model, x = model.cuda(), images().cuda()
    with torch.no_grad():
        out = model.forward_features(x)
        lora.merge(model)
        merged = model.forward_features(x)
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=0)
