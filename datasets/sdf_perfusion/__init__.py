"""Sidestream dark-field (SDF) microcirculation videos scored for perfusion (MFI).

`SdfPerfusion` is the TFDS builder reading the raw layout (labels.csv and videos/*.avi);
`synthesize` writes a synthetic dataset in that same layout whose per-quadrant MFI scores are
the simulated flow types.
"""

from medjax_datasets.sdf_perfusion.sdf_perfusion import (
    SdfDataError,
    SdfPerfusion,
    flow_class,
    mfi,
)
from medjax_datasets.sdf_perfusion.synthetic import synthesize

__all__ = ["SdfDataError", "SdfPerfusion", "flow_class", "mfi", "synthesize"]
