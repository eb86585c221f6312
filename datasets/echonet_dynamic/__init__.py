"""EchoNet-Dynamic echocardiogram videos: ejection fraction and left-ventricle tracings.

`EchonetDynamic` is the TFDS builder reading the dataset's original layout; `synthesize` writes
a synthetic dataset in that same layout whose EF follows from the drawn ventricle.
"""

from medjax_datasets.echonet_dynamic.echonet_dynamic import (
    EchonetDataError,
    EchonetDynamic,
)
from medjax_datasets.echonet_dynamic.synthetic import synthesize

__all__ = ["EchonetDataError", "EchonetDynamic", "synthesize"]
