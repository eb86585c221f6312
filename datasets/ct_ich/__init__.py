"""CT-ICH head CT slices with intracranial hemorrhage masks, subtype and fracture labels.

`CtIch` is the TFDS builder reading the PhysioNet CT-ICH layout (or its Kaggle JPG variant);
`synthesize` writes a synthetic dataset in the PhysioNet layout whose masks are the drawn blood.
"""

from medjax_datasets.ct_ich.ct_ich import CtIch, CtIchDataError
from medjax_datasets.ct_ich.synthetic import synthesize

__all__ = ["CtIch", "CtIchDataError", "synthesize"]
