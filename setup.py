"""medjax: JAX/Flax research codebase for medical imaging and video.

Versions are pinned to the ranges the test suite has been run against; jax's API moves fast.
The top-level `datasets/` folder is installed as `medjax_datasets` so it never clashes with
Hugging Face's `datasets` package.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorflow-datasets>=4.9.10,<4.10",
    "grain>=0.2.18,<0.3",
    "array_record>=0.8,<0.9",
    "opencv-python-headless>=4.10",
    "pydicom>=3.0.2,<3.1",
    "ml-collections>=1.1,<1.2",
    "absl-py>=2.1,<3",
    "numpy>=2.0,<3",
    # Keras applications .h5 weights for --config.model.init_from.
    "h5py>=3.10,<4",
    # TensorBoard event files without TensorFlow (flax/clu writers import TF).
    "tensorboardX>=2.6,<2.7",
    # NIfTI volumes (CT-ICH's ct_scans/, masks/).
    "nibabel>=5.3,<6",
    # Compressed DICOM transfer syntaxes (JPEG, JPEG-LS lossless, JPEG 2000) for pydicom.
    "pylibjpeg>=2.0,<3",
    "pylibjpeg-libjpeg>=2.3,<3",
    "pylibjpeg-openjpeg>=2.4,<3",
    # The ICH web page (medjax.serve), as the reference project served its model.
    "flask>=3.1,<3.2",
    # Classical baselines (PCA, KNN, LDA, NCA, SVM) and reference metrics.
    "scikit-learn>=1.5,<2",
]

EXTRAS = {
    "test": [
        "pytest>=8,<10",
        # Drives headless Chromium in the web page's end-to-end test.
        "selenium>=4.51,<5",
        # Property-based fuzzing of the DICOM and CSV readers (tests/reliability/test_fuzz.py).
        "hypothesis>=6.100,<7",
    ],
}

packages = find_packages(include=["medjax", "medjax.*"])
dataset_packages = ["medjax_datasets"] + [
    "medjax_datasets." + p for p in find_packages(where="datasets")
]

setup(
    name="medjax",
    version="0.1.0",
    description="JAX/Flax research codebase for medical imaging and video",
    python_requires=">=3.10",
    packages=packages + dataset_packages,
    package_dir={"medjax_datasets": "datasets"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
