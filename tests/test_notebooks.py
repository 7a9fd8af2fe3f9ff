"""The CIFAR-10 Colab notebook, executed top to bottom on the CPU in its fast mode, on a small image folder: the
trainer runs as a subprocess, the curves are drawn from its metrics, and the report ends beside Table 6. (The digits
notebook's test is in test_experiments.py.)"""
import json
import os

import pytest

from helpers import write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


@pytest.mark.slow
def test_cifar10_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  data, runs = tmp_path / 'cifar10', tmp_path / 'runs'
  write_image_folder(data, classes=CIFAR_CLASSES, per_class=4)  # 40 training and 40 test images, 32x32
  monkeypatch.setenv('RESNET_JAX_NOTEBOOK_FAST', '1')
  monkeypatch.setenv('RESNET_JAX_NOTEBOOK_DATA', str(data))
  monkeypatch.setenv('RESNET_JAX_NOTEBOOK_RUNS', str(runs))
  monkeypatch.setenv('XLA_FLAGS', '')  # the trainer on one CPU device (its fast settings ask for one)
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p))
  nb = nbformat.read(os.path.join(REPO, 'notebooks', 'cifar10_colab.ipynb'), as_version=4)
  assert not any(cell.get('outputs') for cell in nb.cells), 'commit the notebook with its outputs cleared'
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': REPO}})
  cells = {cell.id: cell for cell in nb.cells}
  outputs = lambda cell: '\n'.join(o.get('text', '') + str(o.get('data', {}).get('text/plain', ''))
                                    for o in cell.outputs)
  text = lambda cell_id: outputs(cells[cell_id])
  with client.setup_kernel():
    for index, cell in enumerate(nb.cells):
      client.execute_cell(cell, index)
    workdir = runs / 'cifar_20'
    rows = metrics_rows(workdir)
    # The training cell once more, as after an interruption: the trainer resumes, here from its final checkpoint.
    again = nbformat.from_dict(cells['train'])
    client.execute_cell(again, nb.cells.index(cells['train']))

  assert 'NO GPU' in text('devices')  # the CPU says so; the fast mode goes on
  # The training cell ends on the last redraw: the command, the curves, the trainer's last lines.
  train = text('train')
  assert '-m resnet_jax.main --config=configs/cifar_20.py' in train and 'step 20/20' in train
  assert any('image/png' in o.get('data', {}) for o in cells['train'].outputs)
  assert [r['step'] for r in rows if 'test_error' in r] == [10, 20]
  assert (runs / 'train.log').read_text().count('step 20/20') == 1  # the log of both runs
  info = json.loads((workdir / 'run_info.json').read_text())
  assert info['invocations'] == 2 and info['wall_seconds'] > 0 and '(cpu)' in info['device']
  assert 'Resumed from' in outputs(again) and 'at step 20.' in outputs(again)
  assert metrics_rows(workdir) == rows  # nothing trained twice
  # The report: ResNet-20 beside Table 6's 8.75, with the example counts of the folder.
  assert 'Examples: 40 train, 40 test (folder: ' in text('report')
  report = (runs / 'report.md').read_text()
  row = next(line for line in report.splitlines() if line.startswith('| resnet-20 | 0 |'))
  assert '8.75 (Table 6, single view)' in row and '40 / 40' in row
  assert "reduced recipe: 20 of the paper's 64000 steps" in row and f'data: image folder {data}' in row
  markdown = next(o for o in cells['report'].outputs if 'text/markdown' in o.get('data', {}))
  assert '| resnet-20 | 0 |' in markdown['data']['text/markdown'] and '![' not in markdown['data']['text/markdown']


def metrics_rows(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
