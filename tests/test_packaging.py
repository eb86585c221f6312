"""Packaging: the repo's datasets/ folder never shadows Hugging Face's `datasets` package."""

from __future__ import annotations

from tests.conftest import run_module


def test_datasets_folder_does_not_shadow_an_installed_datasets_package(tmp_path):
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("IS_THIRD_PARTY = True\n")
    # Run from the repo root, where ./datasets/ is first on sys.path.
    proc = run_module(
        [
            "-c",
            "import datasets, medjax_datasets.crl_ultrasound as crl; "
            "print(datasets.IS_THIRD_PARTY, crl.CrlUltrasound.name)",
        ],
        env_extra={"PYTHONPATH": str(tmp_path / "site")},
    )
    assert proc.stdout.split() == ["True", "crl_ultrasound"]
