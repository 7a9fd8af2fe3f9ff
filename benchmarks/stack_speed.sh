#!/usr/bin/env bash
# The two tested sets side by side on the CPU: the training step of CIFAR ResNet-20 and ResNet-56 (float32, batch
# 128, our defaults: one JAX device per core, BN groups of 64) in images/s for
#   (a) the pinned set (constraints.txt on the oldest tested Python),
#   (b) the newest set (the newest tested Python and releases),
#   (c) the newest set with each XLA:CPU option that could move its convolutions (NEW_VARIANTS below),
#   (d) PyTorch eager on the same network and batch (benchmarks/pytorch_reference.py, channels-last, its default
#       threads).
# Interleaved rounds: every round runs every case once, in reverse order on even rounds, so that a shared machine's
# load hits every case alike. Each case is its own process (`python -m resnet_jax.time_step`), whose compile time
# is recorded too. For every JAX case, XLA's optimised program is dumped and the script says where its
# convolutions run (YNNPACK fusions, oneDNN custom calls, or XLA's own loops) and a digest of the program: a flag that
# leaves the program unchanged (the same digest) cannot change the speed.
#   OLD_PY=.venv/bin/python NEW_PY=.venv-newest/bin/python OUT=DIR bash benchmarks/stack_speed.sh
# Knobs: OLD_PY, NEW_PY (each set's Python), TORCH_PY (a Python with torch; default OLD_PY; empty: no PyTorch),
# NETS (depths, default "20 56"), ROUNDS (default 2), OUT (results folder), STEPS/REPEATS/WARMUP (time_step's
# timing), NEW_VARIANTS (lines of "label XLA_FLAGS...", replacing the list below), LIMIT (seconds per case).
# Results: $OUT/stack_speed.jsonl (one line per case and round: round, net, case, XLA_FLAGS, load average, the
# measurement), $OUT/stack_speed.log, and a table of medians over the rounds on stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
OLD_PY=${OLD_PY:-.venv/bin/python}; NEW_PY=${NEW_PY:-.venv-newest/bin/python}; TORCH_PY=${TORCH_PY-$OLD_PY}
NETS=${NETS:-20 56}; ROUNDS=${ROUNDS:-2}; OUT=${OUT:-/tmp/resnet_jax_stack_speed}
STEPS=${STEPS:-3}; REPEATS=${REPEATS:-3}; WARMUP=${WARMUP:-2}; LIMIT=${LIMIT:-900}
# The newest jaxlib's XLA:CPU options that change where convolutions run (an unknown flag aborts the process; the
# case is then recorded as failed). Options that leave the compiled step unchanged are listed in
# docs/performance.md, with how that was checked. One case per line, "label flags..." (a backslash at the end of a
# line continues it).
NEW_VARIANTS=${NEW_VARIANTS-"onednn --xla_cpu_use_onednn=true
onednn_custom_call --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true
onednn_all_convs --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true \
  --xla_cpu_experimental_ynn_fusion_type=-individual_convolution
eigen_convs --xla_cpu_experimental_ynn_fusion_type="}
mkdir -p "$OUT"; RES=$OUT/stack_speed.jsonl; : > "$RES"
exec > >(tee -a "$OUT/stack_speed.log") 2>&1
export JAX_PLATFORMS=cpu PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# One case per line: "label python xla_flags..."; label torch runs PyTorch.
cases=("pinned $OLD_PY" "newest $NEW_PY")
while read label flags; do  # without -r: a backslash-newline continues a line
  [[ -n "$label" ]] && cases+=("newest+$label $NEW_PY $flags")
done <<< "$NEW_VARIANTS"
[[ -n "$TORCH_PY" ]] && cases+=("torch_eager $TORCH_PY")

date -u; echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; flags:" \
  "$(grep -m1 '^flags' /proc/cpuinfo | grep -o -w -E 'avx2|fma|avx512f|avx512_bf16|avx512_fp16|amx_tile|amx_bf16' \
  | xargs)"
for py in $(printf '%s\n' "$OLD_PY" "$NEW_PY" $TORCH_PY | awk '!seen[$0]++'); do
  echo "$py: $($py -c 'import importlib.metadata as m, platform
def v(p):
  try: return m.version(p)
  except m.PackageNotFoundError: return "-"
print("python", platform.python_version(),
      *("%s %s" % (p, v(p)) for p in ("jax", "jaxlib", "flax", "numpy", "torch")))')"
done

# Prints where the convolutions of the largest optimised program in dump folder $1 run.
conv_routing() {
  python3 - "$1" <<'PYEOF'
import collections, glob, hashlib, re, sys
best = (-1, '')
for path in glob.glob(sys.argv[1] + '/*after_optimizations.txt'):
  txt = open(path).read()
  best = max(best, (len(re.findall(r'\bconvolution\(', txt)) + txt.count('__onednn$convolution'), txt))
txt = best[1]
bodies, name = collections.defaultdict(list), None
for line in txt.splitlines():
  m = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
  if m:
    name = m.group(1)
  elif name:
    bodies[name].append(line)
lib = collections.Counter()
for lines in bodies.values():
  for line in lines:
    m = re.search(r'calls=%?([\w.\-]+).*"kind":"__(\w+?)_fusion"', line)
    if m:
      lib[m.group(2)] += sum('convolution(' in l for l in bodies[m.group(1)])
lib['onednn_custom_call'] = txt.count('custom_call_target="__onednn$convolution"')
total = len(re.findall(r'\bconvolution\(', txt)) + lib['onednn_custom_call']
lib['XLA loops'] = total - sum(lib.values())
# The program without its metadata and module name: equal digests, the same compiled step.
digest = hashlib.sha1(re.sub(r', metadata=\{[^}]*\}|^HloModule .*$', '', txt, flags=re.M).encode()).hexdigest()[:12]
print('convolutions %d: %s; program %s' % (total, ', '.join(f'{k} {v}' for k, v in sorted(lib.items()) if v), digest)
      if total else 'no optimised program dumped')
PYEOF
}

run_case() {  # round net label python flags...
  local round=$1 net=$2 label=$3 py=$4; shift 4
  local flags="$*" load line rc dump=$OUT/hlo/${label}_$net
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  if [[ $label == torch_eager ]]; then
    # pytorch_reference.py needs at least one warm-up step.
    line=$(timeout "$LIMIT" $py benchmarks/pytorch_reference.py --net=cifar --depth="$net" --channels-last \
      --steps="$STEPS" --repeats="$REPEATS" --warmup="$(( WARMUP > 0 ? WARMUP : 1 ))" --json 2>"$OUT/case.err" \
      | tail -1); rc=$?
  else
    rm -rf "$dump"
    line=$(XLA_FLAGS="$flags --xla_dump_to=$dump" timeout "$LIMIT" $py -m resnet_jax.time_step \
      --config=configs/cifar_$net.py --steps="$STEPS" --repeats="$REPEATS" --warmup="$WARMUP" --json \
      2>"$OUT/case.err" | tail -1); rc=$?
    find "$dump" -type f ! -name '*after_optimizations.txt' -delete 2>/dev/null
  fi
  cat "$OUT/case.err" >> "$OUT/stderr.log"
  python3 - "$round" "$net" "$label" "$flags" "$load" "$line" "$dump" "$(tail -1 "$OUT/case.err")" "$rc" "$LIMIT" \
    >> "$RES" <<'PYEOF'
import json, sys
round_, net, label, flags, load, line, dump, err, rc, limit = sys.argv[1:]
try:
  r = json.loads(line)
except ValueError:
  r = {'error': f'timed out after {limit} s' if rc == '124' else (line or err)[-300:] or f'exit status {rc}'}
print(json.dumps(dict(round=int(round_), net=int(net), case=label, xla_flags=flags, load=load, dump=dump, result=r)))
PYEOF
  tail -1 "$RES" | python3 -c '
import json, sys
d = json.load(sys.stdin); r = d["result"]
if "error" in r:
  print("round %d ResNet-%d %-26s load %s  FAILED: %s" % (d["round"], d["net"], d["case"], d["load"], r["error"]))
else:
  print("round %d ResNet-%d %-26s load %s  %6.0f images/s  %5.0f ms/step  %5.0f ms CPU/step%s" % (
      d["round"], d["net"], d["case"], d["load"], r["images_per_sec"], 1e3 * r["step_time_s"],
      1e3 * r["process_cpu_s_per_step"], "  compile %.1f s" % r["compile_s"] if "compile_s" in r else ""))'
}

start=$SECONDS
for round in $(seq "$ROUNDS"); do
  order=("${cases[@]}")
  if (( round % 2 == 0 )); then
    order=(); for ((i = ${#cases[@]} - 1; i >= 0; i--)); do order+=("${cases[i]}"); done
  fi
  for net in $NETS; do
    for c in "${order[@]}"; do
      # shellcheck disable=SC2086
      run_case "$round" "$net" $c
    done
  done
done
echo "total $((SECONDS - start)) s; load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"

echo; echo "Where the convolutions run (XLA's optimised step, last round):"
for net in $NETS; do
  for c in "${cases[@]}"; do
    label=${c%% *}
    [[ $label == torch_eager ]] || echo "  ResNet-$net $label: $(conv_routing "$OUT/hlo/${label}_$net")"
  done
done

echo; python3 - "$RES" <<'PYEOF'
import collections, json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cases, by = [], collections.defaultdict(list)
for d in rows:
  if d['case'] not in cases:
    cases.append(d['case'])
  by[d['net'], d['case']].append(d)
nets = sorted({d['net'] for d in rows})
print('images/s per round (median of the rounds); ms of process CPU per step, compile s: medians; the training loss '
      'after the timed steps (the same data and start for every case of a set: a flag that changes the arithmetic '
      'shows here)')
for net in nets:
  for case in cases:
    ds = by[net, case]
    ok = [d['result'] for d in ds if 'error' not in d['result']]
    per_round = ' / '.join('%.0f' % d['result']['images_per_sec'] if 'error' not in d['result'] else 'failed'
                           for d in ds)
    med = lambda k: statistics.median(r[k] for r in ok) if ok and all(k in r for r in ok) else None
    fmt = lambda v, f: f % v if v is not None else '-'
    print('ResNet-%-3d %-26s %-15s median %6s  CPU %5s ms/step  compile %5s s  loss %s' % (
        net, case, per_round, fmt(med('images_per_sec'), '%.0f'),
        fmt(med('process_cpu_s_per_step') and 1e3 * med('process_cpu_s_per_step'), '%.0f'),
        fmt(med('compile_s'), '%.1f'), fmt(med('final_train_loss'), '%.5f')))
PYEOF
