"""The experiment scripts: sweep bookkeeping (skip, resume, stop), the paper's configs per table, the Fig. 7
measurement against a direct computation, the report from fake runs, and the notebook executed top to bottom."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import fig7, paper, report, sweep, table3, table6
from resnet_jax import config_base, errors, input_pipeline, metrics_io, models, train
from helpers import tiny_config, write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# Sweep: finished runs are skipped, unfinished ones resumed, a stopped run stops the sweep.

def _spec(net, residual=True, **overrides):
  c = tiny_config(**{'model.residual': residual, **overrides})
  return sweep.RunSpec('exp', net, 0, c)


@pytest.mark.slow
def test_sweep_trains_then_resumes_unfinished_and_skips_finished(tmp_path, monkeypatch):
  runs, quiet = str(tmp_path), lambda *_: None
  workdir = _spec('plain-8').workdir(runs)
  three = _spec('plain-8', residual=False, num_steps=3, lr_boundaries=(3,))
  assert sweep.run_sweep([three], runs, log=quiet) == {workdir: 'finished'}
  assert sweep.run_status(workdir, 3) == 'finished'
  assert sweep.run_status(workdir, 6) == 'partial'  # finished at 3 of what is now asked to be 6 steps
  assert sweep.run_status(str(tmp_path / 'nothing'), 6) == 'new'
  info = sweep.read_run_info(workdir)
  assert (info['invocations'], info['planned_steps'], info['last_outcome']) == (1, 3, 'finished')
  assert info['wall_seconds'] > 0 and 'cpu' in info['device']

  # The same run asked for 6 steps is handed back to the trainer (which resumes it from its checkpoint: see
  # test_trainer); here a stand-in trainer logs the remaining steps, to keep the test fast.
  calls = []

  def fake_train(config, wd):
    calls.append((config.num_steps, wd))
    writer = metrics_io.MetricsWriter(wd, resume_step=3)
    writer.write(6, {'train_error': 0.5, 'test_error': 0.5})
    writer.close()
    return {'step': 6}

  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  six = _spec('plain-8', residual=False)
  assert sweep.run_sweep([six], runs, log=quiet) == {workdir: 'finished'} and calls == [(6, workdir)]
  assert [r['step'] for r in metrics_io.read_metrics(os.path.join(workdir, 'metrics.jsonl'))] == [3, 6]
  assert sweep.read_run_info(workdir)['invocations'] == 2
  assert sweep.run_sweep([six], runs, log=quiet) == {workdir: 'skipped'} and len(calls) == 1
  assert sweep.read_run_info(workdir)['invocations'] == 2


def test_a_stopped_run_stops_the_sweep(tmp_path, monkeypatch):
  calls = []

  def fake_train(config, workdir):  # as the trainer returns after a SIGTERM before its first log point
    calls.append(workdir)
    return {'stopped_by_signal': 15}

  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  results = sweep.run_sweep([_spec('a'), _spec('b')], str(tmp_path), log=lambda *_: None)
  assert list(results.values()) == ['stopped'] and len(calls) == 1
  assert sweep.read_run_info(_spec('a').workdir(str(tmp_path)))['last_outcome'] == 'stopped'


# ---------------------------------------------------------------------------------------------------------------
# The configs each table runs.

def test_table6_runs_the_papers_cifar_configs():
  specs = table6.make_specs(table6.VALID_NETS, [0, 1])
  assert len(specs) == 11  # both seeds of a net in one program
  for s in specs:
    kind, depth = s.net.split('-')
    c = s.config
    assert (c.model.family, c.model.depth, c.model.residual, c.model.shortcut) == \
        ('cifar', int(depth), kind == 'resnet', 'A')  # Sec. 4.2: option A in all cases
    assert (c.num_steps, config_base.schedule_boundaries(c), c.batch_size) == (64_000, (32_000, 48_000), 128)
    assert c.warmup.enabled == (int(depth) >= 110)  # the 0.01 warm-up for 110 and 1202 layers
  assert {(s.config.seed, s.config.num_seeds) for s in specs} == {(0, 2)}
  assert specs[0].workdir('R') == os.path.join('R', 'table6', specs[0].net, 'seeds0-1')
  assert set(paper.TABLE6_TEST_ERROR) <= {s.net for s in specs}


def test_table6_shortened_recipe_and_overrides():
  (s,) = table6.make_specs(['plain-56'], [3], steps=200,
                           overrides=sweep.parse_overrides(['data.source=folder', 'data.val_examples=5000']))
  c = s.config
  assert (c.num_steps, config_base.schedule_boundaries(c), c.seed) == (200, (100, 150), 3)  # 32k/48k of 64k
  assert (c.data.source, c.data.val_examples) == ('folder', 5000)
  assert s.workdir('R') == os.path.join('R', 'table6', 'plain-56', 'seed3')
  with pytest.raises(errors.USER_ERRORS, match='valid: plain-20.*resnet-1202'):
    table6.make_specs(['resnet-21'], [0])
  with pytest.raises(errors.USER_ERRORS, match=r"Unknown config field 'data.sorce'.*source"):
    table6.make_specs(['resnet-20'], [0], overrides={'data.sorce': 'folder'})
  with pytest.raises(errors.USER_ERRORS, match='KEY=VALUE'):
    sweep.parse_overrides(['num_steps'])


def test_table3_nets_and_subset_mode(tmp_path):
  write_image_folder(tmp_path, splits=('train',), per_class=5)
  specs = {s.net: s.config for s in table3.make_specs(list(table3.NETS), [0], steps=50, subset_dir=str(tmp_path),
                                                       image_size=32)}
  expected = {'plain-34': (34, False, 'A'), 'resnet-34-A': (34, True, 'A'), 'resnet-34-B': (34, True, 'B'),
              'resnet-34-C': (34, True, 'C'), 'resnet-50': (50, True, 'B')}  # Table 3 / Sec. 3.3
  for net, (depth, residual, shortcut) in expected.items():
    c = specs[net]
    assert (c.model.family, c.model.depth, c.model.residual, c.model.shortcut) == ('imagenet', depth, residual,
                                                                                    shortcut)
    assert paper.net_name(c.model) == net
    assert (c.data.source, c.data.dataset, c.model.num_classes, c.data.val_examples) == \
        ('folder', table3.SUBSET_DATASET, 3, 1)  # 3 classes of 5 images, 10% held out
    assert c.num_steps == 50
  assert specs['resnet-50'].model.bottleneck == 'v1'  # the paper's stride placement
  # A subset is never compared with the paper's ImageNet numbers.
  assert paper.paper_error(table3.SUBSET_DATASET, 'imagenet', 'resnet-34-B') is None
  assert paper.paper_error('imagenet2012', 'imagenet', 'resnet-34-B') == 24.52
  with pytest.raises(FileNotFoundError, match='train/<class>'):
    table3.make_specs(['plain-34'], [0], subset_dir=str(tmp_path / 'nowhere'))


# ---------------------------------------------------------------------------------------------------------------
# Fig. 7: the streaming per-channel std equals a direct computation on all responses at once.

@pytest.mark.slow
def test_layer_stds_match_a_direct_computation():
  c = config_base.cifar(14)
  model = models.create_model(c.model, bn_group_size=0)
  x = jax.random.uniform(jax.random.key(1), (1, 8, 8, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  # Non-trivial BN statistics and affine parameters, so eval-mode BN is not the identity.
  variables = jax.tree_util.tree_map(
      lambda a: a + 0.3 * jax.random.normal(jax.random.key(a.size), a.shape), variables)
  variables = {**variables, 'batch_stats': jax.tree_util.tree_map(jax.numpy.abs, variables['batch_stats'])}
  images = np.asarray(jax.random.randint(jax.random.key(2), (37, 8, 8, 3), 0, 256), np.uint8)
  mean = images.mean(0).astype(np.float32)

  batches = input_pipeline.padded_batches(images, labels=np.zeros(37, np.int32), batch_size=32,
                                          prepare=lambda x: x.astype(np.float32) - mean)
  stds = fig7.layer_stds(model, variables, batches)  # 32 + 5 (padded to 32, masked)

  _, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']))(
      variables, images.astype(np.float32) - mean)
  layers = fig7.layer_order(state['intermediates'])
  assert len(layers) == 13  # the first layer and 2 x 3n 3x3 layers of the blocks for depth 6n+2 = 14
  direct = [np.mean(np.std(np.asarray(y, np.float64), axis=(0, 1, 2))) for y in layers]
  np.testing.assert_allclose(stds, direct, rtol=1e-4)
  # Network order: the first layer works on 8x8 maps with 16 channels, the last on 2x2 with 64.
  assert layers[0].shape[1:] == (8, 8, 16) and layers[-1].shape[1:] == (2, 2, 64)


def test_fig7_layers_of_a_scanned_net_come_in_the_same_order_as_unrolled():
  """scan_blocks stacks a stage's later blocks: their responses are split back into blocks, in network order."""
  c = config_base.cifar(20)
  x = jnp.ones((2, 8, 8, 3))
  shapes = []
  for scan in (False, True):
    c.model.scan_blocks = scan
    model = models.create_model(c.model, bn_group_size=0)
    variables = model.init(jax.random.key(0), x, train=False)
    _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
    shapes.append([y.shape for y in fig7.layer_order(state['intermediates'])])
  assert len(shapes[0]) == 19 and shapes[0] == shapes[1]


# ---------------------------------------------------------------------------------------------------------------
# The report, from fake runs.

def _fake_run(workdir, num_steps, rows, dataset='cifar10', depth=20, residual=True, wall=3661.0, note='',
              family='cifar'):
  os.makedirs(workdir)
  c = config_base.cifar(depth, residual) if family == 'cifar' else config_base.imagenet(depth, residual)
  c.num_steps = num_steps
  c.data.dataset = dataset
  name = os.path.basename(workdir)
  c.seed = int(name.removeprefix('seed')) if name.startswith('seed') else 0  # as a sweep sets it
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(c.to_json())
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  sweep.write_run_info(workdir, {'wall_seconds': wall, 'note': note, 'device': '1 x H100 (gpu)'})


def test_report_puts_ours_next_to_the_paper_and_labels_cut_runs(tmp_path):
  t6 = tmp_path / 'table6'
  for seed, err in ((0, 0.09), (1, 0.085)):
    _fake_run(str(t6 / 'resnet-20' / f'seed{seed}'), 64_000,
              [{'step': 32_000, 'train_error': 0.1, 'test_error': 0.12},
               {'step': 64_000, 'train_error': 0.01, 'test_error': err}])
  _fake_run(str(t6 / 'resnet-56' / 'seed0'), 64_000, [{'step': 30_000, 'train_error': 0.05, 'test_error': 0.2}],
            depth=56)
  _fake_run(str(t6 / 'resnet-56' / 'seed1'), 64_000, [{'step': 64_000, 'train_error': 0.01, 'test_error': 0.07}],
            depth=56)
  _fake_run(str(t6 / 'plain-20' / 'seed0'), 200, [{'step': 200, 'train_error': 0.4, 'val_error': 0.45}],
            residual=False, wall=59.0)
  _fake_run(str(tmp_path / 'digits' / 'resnet-20' / 'seed0'), 600,
            [{'step': 600, 'train_error': 0.0, 'test_error': 0.01}], dataset='digits', note='embedded digits')

  out = tmp_path / 'report.md'
  report.main([str(tmp_path), '--out', str(out)])
  text = out.read_text()
  lines = text.splitlines()
  row = next(l for l in lines if l.startswith('| resnet-20 | 0,1 |'))
  # best 8.50, mean 8.75 +- std 0.35 (sample std of 9.0 and 8.5); the paper's 8.75; difference +0.00; 1h01m per run
  assert '| 8.50 (8.75 ± 0.35, n=2) (single view) |' in row and '| 8.75 (Table 6, single view) | +0.00 |' in row
  assert '64000 of 64000' in row and '1h01m' in row
  assert 'finished' in row
  # The cut run is on its own row, labelled, and not averaged with the finished seed.
  cut = next(l for l in lines if l.startswith('| resnet-56 | 0 |'))
  assert 'CUT SHORT: seed 0 stopped at step 30000 of 64000' in cut and '| 20.00 (single view) |' in cut
  assert '| 6.97 (Table 6, single view) | — |' in cut  # no difference from the paper for a run that did not finish
  done = next(l for l in lines if l.startswith('| resnet-56 | 1 |'))
  assert '| 7.00 (single view) |' in done and '| 6.97 (Table 6, single view) | +0.03 |' in done
  # No paper number for plain nets; a validation error is labelled as such.
  plain = next(l for l in lines if l.startswith('| plain-20 |'))
  assert '| val | ? / ? | — | — |' in plain and '0m59s' in plain
  assert "reduced recipe: 200 of the paper's 64000 steps" in plain
  assert 'no paper recipe for digits' in text and 'embedded digits' in text
  assert 'hardware: 1 x H100 (gpu)' in text
  assert '![Fig. 6 style curves of table6](table6/fig6.png)' in text
  assert (t6 / 'fig6.png').stat().st_size > 1000


def test_paper_table2_and_table3_numbers():
  # Table 2 (top-1, 10-crop, option A for the residual nets) and the rows Table 3 shares with it.
  assert paper.TABLE2_TOP1_ERROR == {'plain-18': 27.94, 'plain-34': 28.54, 'resnet-18-A': 27.88, 'resnet-34-A': 25.03}
  for net in ('plain-34', 'resnet-34-A'):
    assert paper.TABLE2_TOP1_ERROR[net] == paper.TABLE3_TOP1_ERROR[net]
  assert paper.paper_reference('imagenet2012', 'imagenet', 'plain-18') == (27.94, 'Table 2', '10-crop')
  assert paper.paper_reference('imagenet2012', 'imagenet', 'resnet-34-B') == (24.52, 'Table 3', '10-crop')
  assert paper.paper_reference('cifar10', 'cifar', 'resnet-56') == (6.97, 'Table 6', 'single view')
  assert paper.net_name(config_base.imagenet(18).model) == 'resnet-18-A'


def test_report_labels_imagenet_centre_crop_against_the_papers_10_crop(tmp_path):
  t2 = tmp_path / 'table2'
  rows = [{'step': 100, 'train_error': 0.5, 'val_error': 0.3, 'val_top5_error': 0.1}]
  for net, residual in (('plain-18', False), ('resnet-18-A', True)):
    _fake_run(str(t2 / net / 'seed0'), 100, rows, dataset='imagenet2012', depth=18, residual=residual,
              family='imagenet')
  # A 10-crop evaluation of ResNet-18's final step (resnet_jax.evaluate's output) replaces its centre-crop number.
  with open(t2 / 'resnet-18-A' / 'seed0' / 'eval_10crop_step100.json', 'w') as f:
    json.dump({'top1_error': 0.28, 'top5_error': 0.09, 'protocol': '10crop', 'step': 100}, f)
  text = report.render(str(tmp_path), str(tmp_path / 'report.md'), plot=False)
  plain = next(l for l in text.splitlines() if l.startswith('| plain-18 |'))
  assert '| 30.00 (centre crop) |' in plain and '| 27.94 (Table 2, 10-crop) |' in plain
  assert '+2.06 (centre crop vs 10-crop)' in plain
  resnet = next(l for l in text.splitlines() if l.startswith('| resnet-18-A |'))
  assert '| 28.00 (10-crop) |' in resnet and '| 27.88 (Table 2, 10-crop) | +0.12 |' in resnet


@pytest.mark.slow
def test_report_reads_plain_main_workdirs_and_a_single_workdir(tmp_path):
  runs = tmp_path / 'runs'
  train.train_and_evaluate(tiny_config(seed=3), str(runs / 'tiny'))  # a real workdir: checkpoints/ and all
  # A CIFAR-10 ResNet-20 workdir as `python -m resnet_jax.main --workdir=runs/c20` writes it (no run_info.json).
  _fake_run(str(runs / 'c20'), 64_000, [{'step': 64_000, 'train_error': 0.01, 'test_error': 0.09}])
  os.remove(runs / 'c20' / sweep.RUN_INFO)
  text = report.render(str(runs), str(tmp_path / 'report.md'), plot=False)
  assert 'No runs found' not in text and '## runs' in text
  lines = text.splitlines()
  c20 = next(l for l in lines if l.startswith('| resnet-20 | 0 |'))
  assert '| 9.00 (single view) |' in c20 and '| 8.75 (Table 6, single view) | +0.25 |' in c20
  tiny = next(l for l in lines if l.startswith('| resnet-8 | 3 |'))  # net and seed from its config.json
  assert '6 of 6' in tiny and 'finished' in tiny
  # The workdir itself as RUNS_DIR.
  alone = report.render(str(runs / 'c20'), str(tmp_path / 'alone.md'), plot=False)
  assert '## c20' in alone and '| 8.75 (Table 6, single view) | +0.25 |' in alone and 'resnet-8' not in alone


def test_report_without_runs_says_how_to_make_them(tmp_path):
  with pytest.raises(SystemExit, match='run an experiment first'):
    report.main([str(tmp_path / 'missing')])


# ---------------------------------------------------------------------------------------------------------------
# The Colab notebook, top to bottom, on small settings.

@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('RESNET_JAX_NOTEBOOK_FAST', '1')
  monkeypatch.setenv('RESNET_JAX_NOTEBOOK_RUNS', str(tmp_path / 'runs'))
  monkeypatch.setenv('XLA_FLAGS', '')  # the kernel on one CPU device: compiles faster than the 4 of the tests
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p))
  nb = nbformat.read(os.path.join(REPO, 'notebooks', 'resnet_jax_colab.ipynb'), as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': REPO}}).execute()
  outputs = '\n'.join(o.get('text', '') + str(o.get('data', {}).get('text/plain', ''))
                      for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs)
  assert 'plain-8' in outputs and 'resnet-8' in outputs
  assert outputs.count('7 layers, std mean') == 2  # the first layer and 2 per block of ResNet-8
  assert (tmp_path / 'runs' / 'digits_degradation' / 'fig7.png').exists()
  assert (tmp_path / 'runs' / 'report.md').exists()


# ---------------------------------------------------------------------------------------------------------------
# Fig. 6 plots: every seed and their mean.

def test_fig6_draws_every_seed_thin_and_their_mean_bold(tmp_path):
  from experiments import plots
  seed0 = [{'step': 100, 'train_error': 0.5, 'test_error': 0.4}, {'step': 200, 'train_error': 0.3, 'test_error': 0.2}]
  seed1 = [{'step': 100, 'train_error': 0.7, 'test_error': 0.6}, {'step': 200, 'train_error': 0.1, 'test_error': 0.1}]
  fig = plots.draw_fig6({'resnet-20': [seed0, seed1], 'plain-20': seed0})
  plain_ax, resnet_ax = fig.axes[:2]
  assert len(plain_ax.lines) == 2  # one seed: training and test, nothing averaged
  lines = resnet_ax.lines
  assert len(lines) == 6  # per seed: training and test (thin); the mean of each (bold)
  thin = [l for l in lines if l.get_linewidth() < 1]
  bold = [l for l in lines if l.get_linewidth() >= 1]
  assert len(thin) == 4 and len(bold) == 2
  mean_test = next(l for l in bold if l.get_linestyle() == '-')
  np.testing.assert_allclose(mean_test.get_ydata(), [50.0, 15.0])  # (40 + 60) / 2, (20 + 10) / 2
  assert 'mean of 2 seeds' in mean_test.get_label()
  assert sorted(tuple(l.get_ydata()) for l in thin if l.get_linestyle() == '-') == [(40.0, 20.0), (60.0, 10.0)]
  assert plots.plot_fig6({'resnet-20': [seed0, seed1]}, str(tmp_path / 'f.png'))
  assert not plots.plot_fig6({'resnet-20': [[], []]}, str(tmp_path / 'g.png'))
