"""Scripts that regenerate the paper's tables and figures from runs of `resnet_jax.train`.

One command per experiment, run from the repository root (see docs/experiments.md):

  python -m experiments.table6 --runs_dir runs            # Table 6 / Fig. 6 (CIFAR-10 sweep, resumable)
  python -m experiments.fig7 runs/table6                  # Fig. 7 (std of the 3x3 responses)
  python -m experiments.table3 --runs_dir runs ...        # Table 3 (ImageNet shortcut options)
  python -m experiments.digits_degradation --runs_dir runs  # a reduced Fig. 6 on the embedded digits (CPU)
  python -m experiments.report runs                       # Markdown report: ours next to the paper's

Runs live in RUNS_DIR/<experiment>/<net>/seed<k>/ (a trainer workdir plus run_info.json).
"""
