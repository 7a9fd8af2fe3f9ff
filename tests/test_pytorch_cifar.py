"""The independent PyTorch trainer (benchmarks/pytorch_cifar.py): it reads the same folder and split as ours, writes
the same metric keys at the same steps, resumes to the uninterrupted result, and the report puts both side by side."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from experiments import report, sweep  # noqa: E402
from resnet_jax import config_base, data, train  # noqa: E402
from helpers import write_image_folder  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'benchmarks', 'pytorch_cifar.py')
sys.path.insert(0, os.path.dirname(SCRIPT))
import pytorch_cifar  # noqa: E402


def _folder(tmp_path):
  write_image_folder(tmp_path / 'cifar', classes=('cat', 'dog', 'frog'), per_class=10)
  return str(tmp_path / 'cifar')


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_it_reads_the_same_images_labels_and_split_as_ours(tmp_path):
  root = _folder(tmp_path)
  theirs = pytorch_cifar.load(root, val_examples=7)
  c = config_base.cifar(20)
  c.data.source, c.data.data_dir, c.data.val_examples = 'folder', root, 7
  ours = data.load(c.data)
  assert theirs['classes'] == ours.class_names
  for split, images, labels in (('train', ours.train_images, ours.train_labels),
                                ('val', ours.val_images, ours.val_labels),
                                ('test', ours.test_images, ours.test_labels)):
    np.testing.assert_array_equal(theirs[split][0], images, err_msg=split)
    np.testing.assert_array_equal(theirs[split][1], labels, err_msg=split)
  assert len(theirs['val'][1]) == 7 and len(theirs['train'][1]) == 23


def test_same_metric_keys_at_the_same_steps_and_the_report_puts_both_side_by_side(tmp_path):
  root, runs = _folder(tmp_path), tmp_path / 'runs' / 'compare'
  theirs = runs / 'resnet-8-pytorch' / 'seed0'
  assert pytorch_cifar.main([f'--data_dir={root}', '--depth=8', f'--workdir={theirs}', '--steps=20',
                             '--val_examples=6', '--batch_size=8', '--device=cpu']) == 0
  c = config_base.cifar(8)
  c.data.source, c.data.data_dir, c.data.val_examples = 'folder', root, 6
  c.batch_size, c.bn_group_size, c.eval_batch_size, c.model.num_classes = 8, 0, 8, 3
  sweep.shorten(c, 20)  # what `experiments.table6 --steps 20` does; the PyTorch trainer's --steps=20 the same
  ours = runs / 'resnet-8' / 'seed0'
  train.train_and_evaluate(c, str(ours))

  keys = lambda rows: [(r['step'], sorted(r)) for r in rows]
  assert keys(_rows(theirs)) == keys(_rows(ours))
  assert {'val_error', 'test_error', 'train_error', 'lr'} <= set(_rows(ours)[-1])
  assert [r['lr'] for r in _rows(theirs)] == pytest.approx([r['lr'] for r in _rows(ours)])
  with open(theirs / 'data.json') as f, open(ours / 'data.json') as g:
    assert json.load(f) == json.load(g) == {'train_examples': 24, 'val_examples': 6, 'test_examples': 30,
                                            'class_names': ['cat', 'dog', 'frog']}

  text = report.render(str(tmp_path / 'runs'), str(tmp_path / 'report.md'), plot=False)
  lines = text.splitlines()
  for label in ('resnet-8', 'resnet-8 (pytorch)'):
    final = 100 * _rows(theirs if 'pytorch' in label else ours)[-1]['test_error']
    seed_line = next(line for line in lines if line.startswith(f'| {label} | 0 | {final:.2f} |'))
    assert '| test | 24 / 30 | 20 of 20 |' in seed_line


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_resumes_to_the_uninterrupted_result(tmp_path):
  root = _folder(tmp_path)
  flags = [f'--data_dir={root}', '--depth=8', '--steps=60', '--val_examples=6', '--batch_size=8', '--device=cpu',
           '--threads=1']
  whole, cut = tmp_path / 'whole', tmp_path / 'cut'
  assert pytorch_cifar.main(flags + [f'--workdir={whole}']) == 0
  proc = subprocess.Popen([sys.executable, SCRIPT, *flags, f'--workdir={cut}'], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and len(_rows(cut) if (cut / 'metrics.jsonl').exists() else []) < 10:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == pytorch_cifar.STOPPED, out
  stopped_at = torch.load(cut / 'checkpoint.pt', weights_only=False)['step']
  assert 10 <= stopped_at < 60
  assert pytorch_cifar.main(flags + [f'--workdir={cut}']) == 0
  drop = lambda rows: [{k: v for k, v in r.items() if k != 'examples_per_sec'} for r in rows]
  assert drop(_rows(cut)) == drop(_rows(whole))
  a = torch.load(whole / 'checkpoint.pt', weights_only=False)['model']
  b = torch.load(cut / 'checkpoint.pt', weights_only=False)['model']
  assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_one_line(tmp_path, capsys):
  root = _folder(tmp_path)
  assert pytorch_cifar.main([f'--data_dir={tmp_path / "none"}', f'--workdir={tmp_path / "w"}']) == 1
  assert 'No image folder' in capsys.readouterr().err
  assert pytorch_cifar.main([f'--data_dir={root}', '--depth=21', f'--workdir={tmp_path / "w"}']) == 1
  assert '6n+2' in capsys.readouterr().err
