"""resnet_jax: He et al. 2016, "Deep Residual Learning for Image Recognition", in JAX/Flax."""
import logging as _logging

# JAX logs a failed TPU probe at INFO on every start on machines without a TPU; keep the console readable.
_logging.getLogger('jax._src.xla_bridge').setLevel(_logging.WARNING)

__version__ = '0.1.0'
