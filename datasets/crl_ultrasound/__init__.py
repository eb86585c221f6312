"""First-trimester ultrasound crown-rump length (CRL) dataset.

`CrlUltrasound` is the TFDS builder reading the raw layout; `synthesize` writes a synthetic
dataset in that same layout with exact ground truth.
"""

from medjax_datasets.crl_ultrasound.crl_ultrasound import CrlDataError, CrlUltrasound
from medjax_datasets.crl_ultrasound.synthetic import synthesize

__all__ = ["CrlDataError", "CrlUltrasound", "synthesize"]
