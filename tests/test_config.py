"""Every option defined once (config_base.OPTIONS): each field of each config has a default, its choices and a
resume rule; the paper's schedule as fractions of the run; a shortened run by num_steps alone."""
import glob
import os
import re
import runpy

import pytest

from resnet_jax import config_base, models, run_record, validation
from resnet_jax.errors import ConfigError
from helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))


def _load(path):
  return runpy.run_path(path)['get_config']()


def _fields(config, prefix=''):
  for k, v in config.items():
    if hasattr(v, 'items'):
      yield from _fields(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}'


@pytest.mark.parametrize('path', CONFIG_FILES + ['tiny'], ids=lambda p: os.path.basename(p))
def test_every_field_is_an_option_checked_on_resume_or_free_to_change(path):
  config = tiny_config() if path == 'tiny' else _load(path)
  unknown = [f for f in _fields(config) if f not in config_base.OPTIONS]
  assert not unknown, f'fields without an entry in config_base.OPTIONS (default, choices, resume rule): {unknown}'
  rules = {config_base.SAME, config_base.FREE, config_base.SCHEDULE}
  assert all(o.resume in rules for o in config_base.OPTIONS.values())
  validation.check_choices(config)  # every config file's values are valid choices


def test_each_option_s_resume_rule_decides_whether_a_change_blocks_a_resume():
  c = config_base.base()
  checked = run_record._resume_fields(c)
  for name, option in config_base.OPTIONS.items():
    assert (name in checked) == (option.resume == config_base.SAME), name
  assert checked['lr drops at steps'] == [32_000, 48_000]


def test_the_model_options_choices_are_what_the_model_builds():
  assert set(config_base.OPTIONS['model.dtype'].choices) == set(models.DTYPES)
  assert set(config_base.OPTIONS['model.head_init'].choices) == set(models.HEAD_INITS)


def test_the_paper_s_drops_as_fractions_land_exactly_on_its_iterations():
  cifar, imagenet = config_base.cifar(20), config_base.imagenet(50)
  assert config_base.schedule_boundaries(cifar) == (32_000, 48_000)  # Sec. 4.2, of 64k
  assert config_base.schedule_boundaries(imagenet) == (150_000, 300_000, 450_000)  # of 600k
  cifar.num_steps = 4_000
  assert config_base.schedule_boundaries(cifar) == (2_000, 3_000)
  cifar.lr_boundaries = (1_000,)  # an explicit schedule wins
  assert config_base.schedule_boundaries(cifar) == (1_000,)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
@pytest.mark.parametrize('num_steps', [1, 2, 3, 40])
def test_num_steps_alone_shortens_every_config(path, num_steps):
  config = _load(path)
  config.num_steps = num_steps
  validation.validate(config, 1)
  drops = config_base.schedule_boundaries(config)
  assert len(drops) == len(config.lr_drop_fractions) and all(1 <= b <= num_steps for b in drops)
  assert list(drops) == sorted(drops)


def test_a_schedule_that_cannot_fit_suggests_one_the_check_accepts():
  config = config_base.cifar(20)
  config.num_steps, config.lr_boundaries = 2, (32_000, 48_000)
  with pytest.raises(ConfigError) as e:
    validation.validate(config, 1)
  suggestion = re.search(r"--config\.lr_boundaries='(.*?)'", str(e.value)).group(1)
  config.lr_boundaries = eval(suggestion)  # noqa: S307 -- the message's own suggestion, as a user would paste it
  validation.validate(config, 1)
  assert config_base.schedule_boundaries(config) == (1, 2)


@pytest.mark.parametrize('field,value,message', [
    ('model.depth', 21, 'Unknown CIFAR depth 21'),
    ('model.shortcut', 'D', "Unknown config.model.shortcut 'D'; valid choices: A, B, C."),
    ('momentum_form', 'nesterov', "Unknown config.momentum_form 'nesterov'; valid choices: caffe, pytorch."),
])
def test_validate_refuses_a_bad_value_naming_the_field_and_the_valid_choices(field, value, message):
  config = config_base.cifar(20)
  *sections, leaf = field.split('.')
  node = config
  for s in sections:
    node = node[s]
  node[leaf] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    validation.validate(config, 1)
