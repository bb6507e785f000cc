"""The Python API: `import medray` is light, exposes the job functions, and `medray.start` configures S3."""

from __future__ import annotations

import os
import subprocess
import sys

import medray


def test_import_medray_loads_none_of_torch_ray_or_pandas():
    probe = "import sys, medray; print(sorted(m for m in ('torch', 'ray', 'pandas', 'monai') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_every_public_name_resolves_to_what_it_names():
    for name in medray.__all__:
        assert getattr(medray, name) is not None, name
    assert callable(medray.train) and medray.train.__module__ == "medray.jobs"
    assert issubclass(medray.ConfigError, medray.MedrayError)


def test_a_job_function_keeps_its_name_after_the_modules_behind_it_are_imported():
    # No module sits at medray/<job>.py, so importing one never binds a module over the function's name.
    probe = "import medray.evaluation.evaluate, medray.training.trainer, medray; print(medray.evaluate.__name__, callable(medray.train))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split() == ["evaluate", "True"]


def test_start_applies_the_configs_s3_settings_before_ray(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    (tmp_path / "job.yaml").write_text("s3:\n  endpoint_url: http://minio.local:9000\n  region: eu-central-1\n")
    config = medray.start(str(tmp_path / "job.yaml"), ["train.epochs=2"], ray=False)
    assert config.train.epochs == 2
    assert (os.environ["AWS_ENDPOINT_URL_S3"], os.environ["AWS_REGION"]) == ("http://minio.local:9000", "eu-central-1")
