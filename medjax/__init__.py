"""medjax: a JAX/Flax research codebase for medical imaging and video."""

from medjax import hugepages as _hugepages

# `python -m medjax.main` (benchmark, evaluate) restarts itself here with 2 MiB pages where the
# system supports them; see medjax/hugepages.py.
_hugepages.maybe_restart()
