#!/usr/bin/env bash
# XLA CPU flags, one at a time, on the CIFAR ResNet-20 step (ours, float32, batch 128); prints each run's
# step time and process CPU time per step, and which custom calls / library fusions the compiled step contains.
#   JAX_PY=/path/to/python benchmarks/probes/cpu_flags.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
JAX_PY=${JAX_PY:-python}
export JAX_PLATFORMS=cpu PYTHONPATH=$PWD
for flags in "" "--xla_cpu_use_onednn=true" "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true" \
             "--xla_cpu_use_xnnpack=true" "--xla_cpu_experimental_ynn_fusion_type=individual_convolution" \
             "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce,individual_convolution"; do
  echo "=== XLA_FLAGS='$flags'   load: $(uptime | sed 's/.*load/load/')"
  XLA_FLAGS="$flags" $JAX_PY - <<'PYEOF'
import collections, re
import jax
from resnet_jax import config_base, mesh as mesh_lib, models, time_step, train_step, xla_workarounds
c = config_base.cifar(20)
mesh = mesh_lib.make_mesh()
inp = time_step.synthetic_input(c, mesh, examples=1000)
model = models.create_model(c.model, bn_group_size=c.bn_group_size)
state = train_step.create_state(c, model, mesh)
steps = xla_workarounds.StepCaller(train_step.make_step(c, model, mesh, inp), c, mesh, inp.input_shardings)
txt = steps.lower(state, *next(inp.train_inputs(0))).compile().as_text()
calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', txt))
print('  compiled step: %d plain convolutions, %d library (__ynn/__xnn/__onednn) fusions, custom calls %s' % (
    len(re.findall(r'\bconvolution\(', txt)), len(re.findall(r'calls=%?__(?:ynn|xnn|onednn)', txt))
    or len(re.findall(r'kind=kCustom', txt)), dict(calls)))
r = time_step.run(c, steps=3, repeats=3, warmup=1)
print('  step %.0f ms (windows %s), %.0f ms process CPU per step, compile %.1f s' % (
    1e3 * r['step_time_s'], ', '.join('%.0f' % (1e3 * t) for t in r['step_times_s']),
    1e3 * r['process_cpu_s_per_step'], r['compile_s']))
PYEOF
done
